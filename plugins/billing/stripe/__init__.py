"""Stripe as the billing provider: meter events (:mod:`.client`, the plugin the registry loads
as ``controlplane.plugins.billing.stripe:spec``), and what only Stripe has: the price catalog
published to it (:mod:`.catalog`) and its webhooks (:mod:`.webhooks`).

:class:`StripeBilling` is a :class:`~controlplane.interfaces.Billing` and a
:class:`~controlplane.interfaces.CatalogPublisher`. Stripe's webhooks are received by
:class:`~.webhooks.StripeWebhooks` whatever the billing plugin (``[stripe]`` configures them);
only provisioning an org needs this plugin's Stripe client.
"""

from __future__ import annotations

from controlplane.plugins.billing.stripe.client import StripeBilling, StripeBillingConfig, spec

__all__ = ["StripeBilling", "StripeBillingConfig", "spec"]
