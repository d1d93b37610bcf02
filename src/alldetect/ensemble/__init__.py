"""Combiners (SAP, WEN, fitted), the ensemble folder and its spec, and building one from member runs."""
