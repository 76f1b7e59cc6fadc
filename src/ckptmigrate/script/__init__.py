"""Revision scripts: the pure graph (``revision``) and the files (``directory``)."""
