"""Bans shared across a fleet of hosts through Redis (FLEET_REDIS_URL): each host publishes its
own bans and lifts from the ban store's change feed and applies the others' under its own guards.
docs/fleet.md has the design and the trust model."""
