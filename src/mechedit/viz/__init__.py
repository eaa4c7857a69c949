"""Figures (plotly) for mechedit's results. Result objects' ``.plot()`` methods call into here."""
