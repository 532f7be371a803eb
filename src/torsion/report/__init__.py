"""The HTML report of a run directory."""

from torsion.report import sections  # noqa: F401  (registers the analysis sections)
from torsion.report.html import SECTIONS, build_report

__all__ = ["SECTIONS", "build_report"]
