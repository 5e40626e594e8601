"""Alerts to the operator's webhooks: what fires (`scanner`), how it is signed (`signing`), how it is sent (`delivery`).

Every alert goes through the store's outbox first, so a restart loses none and a threshold fires once
per user, period and fraction however many instances run; one instance delivers each (a claimed lease).
"""
