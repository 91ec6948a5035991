"""Scheduling in simulated time: client sampling, device profiles, round policies, async events."""

from simulator.scheduling.devices import MBIT, Devices, Profiles, client_durations
from simulator.scheduling.policies import (
    DROP_REASONS,
    Event,
    EventQueue,
    RoundPlan,
    VirtualClock,
    cohort_size,
    drop_counts,
    plan_round,
)
from simulator.scheduling.sampling import SampleStreams, sample_clients, sample_cohort, select_eval_clients

__all__ = [
    "DROP_REASONS", "MBIT", "Devices", "Event", "EventQueue", "Profiles", "RoundPlan", "VirtualClock",
    "client_durations", "cohort_size", "drop_counts", "plan_round", "SampleStreams", "sample_clients", "sample_cohort",
    "select_eval_clients",
]
