"""Reminders: ``/remind`` (and, later, the ``set_reminder`` tool) store them; a delivery loop per
platform posts each once, on time, with a mention of whoever set it (:mod:`.service`)."""
