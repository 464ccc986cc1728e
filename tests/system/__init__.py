"""System tests by behaviour: faults, hostile input, gunicorn, overload, reloads, soak."""
