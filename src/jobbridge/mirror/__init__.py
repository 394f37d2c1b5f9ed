"""Status mirror: job transitions written to DynamoDB and MongoDB in jobbridge's own layout.

Each store writer applies a :class:`~jobbridge.mirror.transition.Transition` idempotently and monotonically
(conditional on the transition's sequence number) with at most one write request per store, so a late or
duplicated event never moves a mirrored status backwards.
"""
