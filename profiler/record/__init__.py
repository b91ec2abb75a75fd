"""The record layer: the run record, the output folder's layout, the catalogue of codes. Imports only probes."""
