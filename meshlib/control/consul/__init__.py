"""Consul as a control plane: its compiled discovery chain mapped onto meshlib's route table
(:mod:`meshlib.control.consul.chain`) and its filter expressions (:mod:`meshlib.control.consul.bexpr`).

Pure code (no I/O): the watches that fetch chains and endpoints live with the Consul agent client
(:mod:`meshlib.discovery.consul`).
"""
