"""Self-contained HTML reports (plotly.js inlined once; they open offline from disk).

* :func:`write_edit_report`: one page per edit (the ``--out`` directory of ``mechedit edit``): the fact, its
  causal trace, the locate decision and evidence, the change, before/after answers, the evaluation and free
  generations side by side. ``mechedit report --edit DIR`` / ``mechedit edit --report``.
* :func:`write_study_report`: one page for a study's results directory (JSON results drawn with their own
  ``.plot()``, markdown tables, PNG figures). ``mechedit report --study DIR``.
"""

from mechedit.report.edit import EditOutput, write_edit_report
from mechedit.report.study import write_study_report

__all__ = ["EditOutput", "write_edit_report", "write_study_report"]
