"""recpipe: an offline batch pipeline for off-policy RL of language models.

    import recpipe
    con = recpipe.connect("runs/demo")          # DuckDB, every table a view, read-only
    con.sql("SELECT policy_version, avg(reward) FROM rollouts GROUP BY 1").show()
"""

from recpipe.store import Store, connect

__version__ = "0.1.0"
__all__ = ["Store", "__version__", "connect"]
