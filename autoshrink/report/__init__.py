"""Tables and plots of a run: the Pareto plot (PNG and interactive HTML), rich tables, report.md.

Each output first takes a plain record from :mod:`.records` (Optuna's pattern: compute the record,
then render it), so a row is computed once and every output shows the same thing:

- :mod:`.records`: :class:`ParetoPlotData` (which trials are feasible, infeasible, failed, on the
  front, chosen; where the budget lines go), the chosen model against the teacher, the trials
  closest to the budget and what each would have to change;
- :mod:`.png` (matplotlib) and :mod:`.html` (plotly): the Pareto plot;
- :mod:`.terminal`: rich tables; :mod:`.markdown`: ``report.md``; :mod:`.files`: CSV;
- :mod:`.formatting`: units, number formats and colours shared by all of them.

matplotlib, plotly and rich are imported inside the functions that use them, so
``import autoshrink.report`` stays light. Every file is written to a temporary name in the target
folder first and then moved into place with ``os.replace``, so a crash never leaves half a report
behind.
"""

from __future__ import annotations

from autoshrink.report.files import write_csv_atomic
from autoshrink.report.formatting import AXIS_COLUMNS
from autoshrink.report.html import plot_pareto_html
from autoshrink.report.markdown import baseline_text, finalist_lines, near_ties_text, write_report_md
from autoshrink.report.png import plot_pareto
from autoshrink.report.provenance import where_text
from autoshrink.report.records import ParetoPlotData, pareto_plot_data
from autoshrink.report.terminal import chosen_table, front_table, nearest_table, plan_table, trials_table

__all__ = [
    "AXIS_COLUMNS",
    "ParetoPlotData",
    "baseline_text",
    "chosen_table",
    "finalist_lines",
    "front_table",
    "near_ties_text",
    "nearest_table",
    "pareto_plot_data",
    "plan_table",
    "plot_pareto",
    "plot_pareto_html",
    "trials_table",
    "write_csv_atomic",
    "where_text",
    "write_report_md",
]
