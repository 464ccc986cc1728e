"""An implicit-feedback ALS recommender: its training, its artefact and its two servers.

`artefact` needs numpy alone and is shared by both servers; `train` runs in the kserve venv
(which holds `implicit`); `kserve_server` and `mlserver_runtime` each run in their own venv.
"""
