"""recpipe: an offline batch pipeline for off-policy RL of language models.

    import recpipe
    con = recpipe.connect("runs/demo")          # DuckDB, every table a view, read-only
    con.sql("SELECT policy_version, avg(reward) FROM rollouts GROUP BY 1").show()
"""

__version__ = "0.1.0"
__all__ = ["Store", "__version__", "connect"]


def __getattr__(name: str) -> object:
    # The store (DuckDB, Delta Lake) loads on first use: recpipe.train.compute and recpipe.models import
    # with torch and transformers alone (bench/bench_gpu.py on a GPU machine).
    if name in ("Store", "connect"):
        from recpipe import store

        return getattr(store, name)
    raise AttributeError(f"module 'recpipe' has no attribute {name!r}")
