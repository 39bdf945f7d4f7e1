"""Stand-alone client examples for the serving container; each file runs on its own (`python FILE --help`)."""
