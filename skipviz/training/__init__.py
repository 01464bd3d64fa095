"""Training: the gated joint phase (:mod:`~skipviz.training.joint`), the export of weights and model card
(:mod:`~skipviz.training.export`), the plan head distilled from the gates (:mod:`~skipviz.training.plan`)."""
from .export import card_flops, export, refresh_card_flops
from .joint import TrainConfig, one_cycle_lr, rate_target, train
from .plan import PlanConfig, export_plan, fit_plan_head, plan_targets

__all__ = ["PlanConfig", "TrainConfig", "card_flops", "export", "export_plan", "fit_plan_head", "one_cycle_lr",
           "plan_targets", "rate_target", "refresh_card_flops", "train"]
