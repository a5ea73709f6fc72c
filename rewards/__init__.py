"""Reward models behind one interface: ``reward(pixels in [0, 1], prompts) -> output``.

A stub in this release: the reward models, ``load_reward`` and ``vialign score`` come with the rewards
work (see DESIGN.md section 7). ``rewards`` never imports ``vialign``.
"""

__all__: list[str] = []
