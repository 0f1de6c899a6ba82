"""The one runner: the life of every gradlab store, whatever command fills it.

A command describes its work as a :class:`Job` (a frozen, picklable dataclass holding its resolved config): the
store template, the units, how one unit is computed, and what to finalize.  :func:`run_job` does the rest, the
same way for every command:

1. the job is already validated (``resolve``/``validate`` functions raise :class:`gradlab.errors.UsageError`
   before anything is written); its input files are hashed;
2. the store's lock is taken, the template is written atomically (:func:`gradlab.store.create_store`), or an
   existing store is reopened with ``resume`` -- refused if its config or any input file's SHA-256 changed;
3. every unit whose ``done`` entries are False is computed -- locally, or as Dask tasks on a local cluster
   (``workers``) or a running scheduler (``scheduler``), each worker preparing the job's heavy state (models,
   data) once and reusing it -- and its arrays are written into its region before the unit is marked done;
4. ``finalize`` writes the derived variables from the stored units (idempotent), and the store gets consolidated
   metadata.  Progress goes to stderr; provenance (versions, git revision, platform, argv) is in every store.

Every unit runs with the torch thread count recorded in the store (attr ``torch_threads``), so ``--resume``,
``--workers`` and ``--scheduler`` write the same bits as one uninterrupted local run.
"""

from gradlab.store import store_exists_error
from gradlab.runner.job import Job, RunSummary, Template, Unit, UnitContext
from gradlab.runner.run import input_hashes, run_job, unit_done
from gradlab.runner.threads import torch_threads

__all__ = ["Job", "RunSummary", "Template", "Unit", "UnitContext", "input_hashes", "run_job", "store_exists_error", "torch_threads",
           "unit_done"]
