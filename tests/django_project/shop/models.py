from __future__ import annotations

from django.db import models


class Order(models.Model):
    """A row a task writes: ``ref`` names the call that wrote it."""

    ref = models.CharField(max_length=100)
    amount = models.IntegerField()

    class Meta:
        app_label = "shop"
