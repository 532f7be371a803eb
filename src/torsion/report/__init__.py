"""The HTML report of a run directory."""

from torsion.report import motion_figures, sections  # noqa: F401  (register the analysis sections)
from torsion.report.html import SECTIONS, build_report

__all__ = ["SECTIONS", "build_report"]
