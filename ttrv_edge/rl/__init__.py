"""The TTRV reinforcement learning, in the order one step runs it.

``sampling`` (N rollouts of one prompt from a shared prefix) -> ``rewards`` (answer frequency + entropy, group
advantages) -> ``scoring`` (each completion token's log-prob and entropy under the policy) -> ``loss`` (the clipped
GRPO loss, back-propagated in micro-batches) -> ``update`` (one guarded GRPO update: the recipe that calls the
four before it) -> ``loop`` (``AdaptationLoop``: episodic and transductive runs). ``records`` holds what they
exchange and report; ``guards`` the NaN/Inf step guard and the collapse detector; ``distributed`` the data-parallel
split of a transductive run under torchrun (each rank's share, the all-reduces). Nothing is imported here.
"""
