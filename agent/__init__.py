"""ringfence endpoint agent: sensors, evidence chain, spool, session, response actions."""

__version__ = "0.1.0"
