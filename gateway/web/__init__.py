"""The Flask web layer: the app (`app`), its routes, the operations endpoints, the hooks every
request passes and the JSON error handlers.
"""
