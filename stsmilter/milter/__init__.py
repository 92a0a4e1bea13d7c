"""The milter front end: stsmilter as a pymilter/libmilter milter (the submission-time gate).

session.py is the milter (a Milter.Base subclass asking the engine's Decider); stop.py,
wake.py and shed.py work around libmilter's listener and worker pool (a prompt stop,
a stranded session, out of file descriptors). Only this package imports pymilter.
"""
