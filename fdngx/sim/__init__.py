"""Simulated FastDeploy replicas (fdngx sim)."""
