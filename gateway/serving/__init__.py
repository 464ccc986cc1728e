"""Serving: the Flask app as an ASGI app on uvicorn's loop (`asgi_app`) and the gateway's HTTP edge
(`edge`).
"""
