"""Requester accounts, their API keys and credit, holds, and on-chain deposits."""
