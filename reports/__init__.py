"""Renders a finished run: report.html, PNG plots (and later JUnit). Reads run data only.

Import the submodules directly (`from reports.render import render_report`);
this package imports nothing heavy so that the CLI starts fast.
"""
