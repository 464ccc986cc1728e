"""Real model servers (KServe, MLServer) serving a real recommender, for the gateway's tests.

Each server runs from a virtual environment of its own (`make model-servers`); the gateway and
pytest only start them as child processes (`model_servers.processes`) and never import them.
"""
