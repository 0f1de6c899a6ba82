"""The schema of every store kind, one module each: dims, variable names, long names and units -- one vocabulary
for stores, CLI flags and plots.  Pure numpy (the analysis side imports it without torch).

- :mod:`gradlab.schema.probe` -- ``gradlab probe`` stores (and the registered quantities' variables);
- :mod:`gradlab.schema.sharpness` -- ``gradlab sharpness`` stores;
- :mod:`gradlab.schema.train` -- ``gradlab train`` stores;
- :mod:`gradlab.schema.monitor` -- the live noise monitor's stores (:mod:`gradlab.monitor`);
- :mod:`gradlab.schema.cbs` -- ``gradlab cbs`` stores.
"""

from gradlab.schema.probe import (GROUPS, HIST_BINS_PER_DECADE, HIST_MAX_EXP, HIST_MIN_EXP, entry_bin_edges,
                                  entry_bin_index, entry_histogram, probe_variables, quantity_variables)

__all__ = ["GROUPS", "HIST_BINS_PER_DECADE", "HIST_MAX_EXP", "HIST_MIN_EXP", "entry_bin_edges", "entry_bin_index",
           "entry_histogram", "probe_variables", "quantity_variables"]
