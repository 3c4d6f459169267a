"""lm-eval task definitions shipped with the repo (``python -m train.evaluate`` always includes this folder).

Each task is a YAML file lm-eval's ``TaskManager`` indexes, beside its data; a ``data_files`` path relative to
its YAML is resolved against the YAML's folder by ``train.evaluate`` (lm-eval itself reads it from the current
directory).
"""
