"""What the stages, the benchmark and the synthetic clips share: camera geometry and
alignment (``geometry``), the tracker's landmark ids by region (``topology``), filling and
smoothing over time (``timeseries``), the pretrained files shipped in registry packages
(``assets``), finding clips in a folder (``clips``), JSON-safe values (``jsonutil``) and the
command line's progress bars (``progress``). No torch here."""
