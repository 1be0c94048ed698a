"""Monitoring as code: Grafana dashboards, Grafana provisioning and the local Prometheus config."""
