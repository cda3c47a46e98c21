"""Inspection: ``explain`` and its report (text, HTML, graph dumps), and ``python -m para_fx``."""
