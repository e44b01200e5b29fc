"""Metrics torchmetrics lacks.

- :class:`PerDomainAccuracy`: accuracy per domain (domain generalisation, DomainBed).
"""

from .domain_accuracy import PerDomainAccuracy

__all__ = ["PerDomainAccuracy"]
