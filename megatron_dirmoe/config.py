"""`DirMoEConfig`: every DirMoE router hyperparameter, its paper default, and its valid range.

This module is the single place where a DirMoE default is written down. The command-line flags
(`--dirmoe-<field-name-with-dashes>`) are generated from the dataclass fields by
:func:`add_dirmoe_args`, and :func:`dirmoe_config_from_args` maps a parsed namespace back (or
reads the resolved config a run stored in its args), so a field and its flag cannot drift apart.

Pure Python: no torch, no Megatron imports (the HF model code and the tests import it freely).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["DirMoEConfig", "RECIPES", "add_dirmoe_args", "dirmoe_config_from_args", "flag_name",
           "IMPLICIT_IN_OLDER_CHECKPOINTS", "megatron_aux_loss_on"]

FLAG_PREFIX = "--dirmoe-"

# r = alpha_hi / alpha_lo used when neither `prior_ratio` nor `prior_mass` is given. The paper notes
# quote r ~ 39.7 (and alpha_hi = r * alpha_lo ~ 1.99, which holds for alpha_lo = 0.05).
DEFAULT_PRIOR_RATIO = 39.7

# Named recipes (`--dirmoe-recipe`); the first is the default.
RECIPES = ("calibrated", "paper", "paper-notes")

# Fields whose default depends on the recipe (None in the dataclass = "the recipe's"). None here
# means: computed from other fields (see `DirMoEConfig._resolve_recipe_defaults`). Chosen on the
# validation split (docs/ROUTER_COMPARISON.md, "How the default was chosen").
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Near the posterior mean and without the Dirichlet KL: at the scales measured, the sampling
    # noise and the KL cost held-out loss.
    # The count is held by the per-layer count controller rather than a penalty, and (k >= 2)
    # the load by the per-expert load controller rather than the balance term.
    # With 32 or more experts and k >= 2 the recipe adds its own Switch loss on the posterior
    # mean; the count controller then counts the gates' own choice with a fallback token at
    # 3k/4, in proportion to its miss, and the load controller steps 0.01 instead of 0.03;
    # these depend on E and are resolved by `DirMoEConfig.calibrated_for` (None here).
    "calibrated": dict(posterior_scale=1000.0, kl_weight=0.0, renormalize=None,
                       count_weight=None, count_control_rate=3e-2, load_control_rate=None,
                       balance_weight=None, aux_loss_coeff=None,
                       aux_loss_scores="posterior-mean", count_control_on=None,
                       count_control_gain=None),
    # The paper's values (Table 4, eq. 16); count_weight, the balance term, the controllers and
    # an aux loss of the router's own are unused by these recipes.
    "paper": dict(posterior_scale=20.0, kl_weight=1e-2, renormalize=True, count_weight=0.1,
                  count_control_rate=0.0, load_control_rate=0.0, balance_weight=0.1,
                  aux_loss_coeff=0.0, aux_loss_scores="gates", count_control_on="routed",
                  count_control_gain=0.0),
    "paper-notes": dict(posterior_scale=20.0, kl_weight=1e-2, renormalize=True,
                        count_weight=0.1, count_control_rate=0.0, load_control_rate=0.0,
                        balance_weight=0.1, aux_loss_coeff=0.0, aux_loss_scores="gates",
                        count_control_on="routed", count_control_gain=0.0),
}

# The calibrated recipe's fine-grained rule (docs/ROUTER_COMPARISON.md, steps 8, 9 and 11):
# from 32 experts on (k >= 2), the router's own Switch loss on the posterior mean at 0.03.
# Chosen on the validation split: it cost 0.014 at E=8 (k = 2), tied at E=16 (k = 2) and gained
# 0.028 at E=32 (k = 4) and 0.055 at E=64 (k = 8); at E=32, k = 2 it gained 0.038 but left an
# expert starved (0.22 of uniform) until the load controller's step was cut (below).
FINE_GRAINED_EXPERTS = 32
FINE_GRAINED_MIN_K = 2
FINE_GRAINED_AUX_LOSS_COEFF = 3e-2
# The load controller's step: 0.03, and 0.01 next to the router's own aux loss, which balances
# the gates already; the smaller step's sign-rule cycle is smaller (step 11: at E=32, k = 2 the
# least-loaded expert 0.65 of uniform instead of 0.40, the lowest seed 0.49 instead of 0.22).
LOAD_CONTROL_RATE = 3e-2
FINE_GRAINED_LOAD_CONTROL_RATE = 1e-2


def _load_control_rate_next_to(aux_loss_coeff: float) -> float:
    """The calibrated recipe's load-controller step (k >= 2) next to the router's own aux loss."""
    return FINE_GRAINED_LOAD_CONTROL_RATE if aux_loss_coeff > 0 else LOAD_CONTROL_RATE

# The count controller next to that aux loss (`count_control_on` 'partial', `count_control_gain`):
# a token on the top-k fallback counts 3/4 of its k experts, and c steps in proportion to the
# miss, a full step from a miss of k/4 on. Chosen on the validation split with the aux loss on:
# at E=32, k=2 counting a fallback token 0 ('gates') ran the count 13.6% over k (a tenth of the
# tokens on the fallback, each taking k experts the count did not see), and the sign rule held
# the median step's count at k while the mean ran 3-8% over (+2.8% at E=32, k=4, +7.4% held out;
# +1.3% and +2.0% with these, the loss unchanged).
PARTIAL_FALLBACK_SHARE = 0.75
GATES_COUNT_CONTROL_GAIN = 4.0
# Per `count_control_on` value: the share of its k fallback experts that a token on the top-k
# fallback counts for the count controller (below 1: the controller counts the gates' choice).
FALLBACK_COUNTED = {"routed": 1.0, "gates": 0.0, "partial": PARTIAL_FALLBACK_SHARE}

# Fields added after runs first stored their resolved config, with the value those runs used:
# a checkpoint without `recipe` trained with the notes-literal recipe (then called "paper").
# A stored config without `count_control_rate` held its count with the count penalty alone, and
# one without `load_control_rate` its load with the balance term alone.
# One without `unnormalized_weight` weighted a single expert by its posterior mean share; one
# without `count_control_on` counted routed experts, and one without `aux_loss_scores` gave
# Megatron's aux loss the gate probabilities; one without `aux_loss_coeff` had no aux loss of
# the router's own; one without `count_control_gain` stepped c by the sign rule; one without
# `load_control_floor` stepped b toward the mean load.
IMPLICIT_IN_OLDER_CHECKPOINTS = {"recipe": "paper-notes", "slab_mean": "head",
                                 "count_control_rate": 0.0, "load_control_rate": 0.0,
                                 "unnormalized_weight": "posterior-mean",
                                 "count_control_on": "routed", "aux_loss_scores": "gates",
                                 "aux_loss_coeff": 0.0, "count_control_gain": 0.0,
                                 "load_control_floor": 1.0}
# A stored config without this field predates the three-head "paper" recipe: its "paper" is
# today's "paper-notes".
_FIELD_OF_THREE_HEAD_RELEASE = "tau_schedule"


def _doc(text: str, **kwargs: Any):
    """A dataclass field whose help text is the flag's help text."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class DirMoEConfig:
    """Hyperparameters of the DirMoE (Dirichlet-routed MoE) router.

    Defaults follow the paper (Table 4 and Sec. 4) except where the calibrated recipe (the
    default ``recipe``) adds its own terms; README "The router" lists the sources. Construction
    validates every range that does not depend on the number of experts; call
    :meth:`validate_for` with the number of experts to check the rest (the router and the CLI
    do this at start-up). Frozen: nothing writes to it after construction.
    """

    recipe: str = _doc(
        "'calibrated': route where the spike gate's logit clears the layer's threshold (l + c "
        ">= 0, i.e. pi = sigmoid(l / tau) >= 1/2 at c = 0, in training and evaluation alike; "
        "top-k when none does), hold the mean count at k with the per-layer count controller c "
        "and balance each gate's batch firing rate against the prior k/E; 'paper': the paper's router structure (gate "
        "logits plus per-expert alpha_hi(x)/alpha_lo(x) heads, posterior conditioned on the "
        "relaxed gates, relaxed weights normalize(z * theta), sparsity (sum z - k)^2 on the "
        "sample, no balance term); 'paper-notes': the paper notes read literally (one softmax "
        "slab head, route where the combined weight w >= --dirmoe-route-threshold, penalty "
        "(sum pi - k)^2, no balance term)",
        default="calibrated",
    )
    target_k: int = _doc(
        "target number of active experts per token k; the count controller (or penalty) holds "
        "the mean count at k "
        "and the spike bias is initialised so that every gate fires with probability k/E",
        default=1,
    )
    max_active: Optional[int] = _doc(
        "hard cap on active experts per token (bounds dispatcher buffers); default min(E, 4k)",
        default=None,
    )
    route_threshold: float = _doc(
        "recipe 'paper' only: expert i is routed when its combined weight w_i >= this "
        "threshold; in (0, 1)",
        default=0.125,
    )
    renormalize: Optional[bool] = _doc(
        "renormalise the routing probabilities over the active set; default: the recipe's "
        "(calibrated: when k >= 2, since a single renormalised weight is always 1 and would cut "
        "the router off from the LM loss, as Megatron's top-1 needs pre-softmax; paper: on)",
        default=None,
    )
    tau_start: float = _doc("spike (Gumbel-Sigmoid) temperature at iteration 0", default=2.0)
    tau_end: float = _doc("spike temperature at the end of the schedule (the floor tau_min of "
                          "the exponential schedule)", default=0.3)
    tau_schedule: str = _doc(
        "shape of the tau_z schedule: 'cosine' from tau_start to tau_end over the horizon, or "
        "'exponential' max(tau_end, tau_start * rho^t)",
        default="cosine",
    )
    tau_decay: Optional[float] = _doc(
        "rho of the exponential tau_z schedule, in (0, 1); default: the rho that reaches "
        "tau_end at the end of the horizon",
        default=None,
    )
    prior_scale_start: float = _doc("Dirichlet prior scale lambda_p at iteration 0", default=0.5)
    prior_scale_end: float = _doc("Dirichlet prior scale lambda_p at the schedule end", default=0.3)
    prior_scale_schedule: str = _doc(
        "shape of the lambda_p schedule: 'cosine' or 'exponential'", default="cosine"
    )
    schedule_iters: Optional[int] = _doc(
        "horizon T of the tau_z and lambda_p schedules in iterations; default: the run's "
        "--train-iters",
        default=None,
    )
    posterior_scale: Optional[float] = _doc(
        "posterior concentration scale lambda_q (alpha_q = max(lambda_q * posterior mean, "
        "floor)); default: the recipe's (calibrated 1000, i.e. near the posterior mean; paper "
        "20, paper eq. 16)",
        default=None,
    )
    prior_ratio: Optional[float] = _doc(
        "r = alpha_hi / alpha_lo of the spike-dependent prior; default 39.7, or derived from "
        "--dirmoe-prior-mass when that is given (set at most one of the two)",
        default=None,
    )
    prior_mass: Optional[float] = _doc(
        "prior mean mass m on the k active experts; when set, r = m (E - k) / ((1 - m) k) "
        "(m = 0.9 gives r = 63 for E=8, k=1)",
        default=None,
    )
    prior_simpson: Optional[float] = _doc(
        "calibrator: the expected Simpson index E[sum_i theta_i^2] of the prior Dirichlet with k "
        "experts on at the end of the schedule; sets --dirmoe-prior-scale-end in closed form. "
        "Allowed between the Simpson index of the prior mean and 1",
        default=None,
    )
    prior_mass_variance: Optional[float] = _doc(
        "calibrator: the variance of the prior's mass on the k active experts (a Beta variable) "
        "at the end of the schedule; sets --dirmoe-prior-scale-end in closed form. Allowed in "
        "(0, m (1 - m)), m the prior mean mass",
        default=None,
    )
    posterior_simpson: Optional[float] = _doc(
        "calibrator: the expected Simpson index of the posterior Dirichlet at the prior's "
        "k-active shape; sets --dirmoe-posterior-scale in closed form",
        default=None,
    )
    alpha_lo: float = _doc("prior concentration of an inactive expert (before lambda_p)", default=0.05)
    alpha_floor: float = _doc(
        "lower clamp of every Dirichlet concentration (torch's gamma sampler is wrong below ~1e-3)",
        default=0.005,
    )
    alpha_ceiling: float = _doc(
        "upper clamp of every Dirichlet concentration (torch's Dirichlet gradient is unstable "
        "near 1e4)",
        default=1000.0,
    )
    kl_weight: Optional[float] = _doc(
        "weight beta_theta of the Dirichlet KL term; default: the recipe's (calibrated 0, paper "
        "0.01)",
        default=None,
    )
    sparsity_weight: float = _doc(
        "recipe 'paper' only: weight lambda_sparsity of the expected-k penalty (sum_i pi_i - k)^2",
        default=1e-2,
    )
    count_weight: Optional[float] = _doc(
        "recipe 'calibrated' only: weight of the count penalty E[(N - k)^2], the expected "
        "squared miss of the count N of gates that fire (N = sum_i Bernoulli(pi_i)); >= 0. "
        "Default 0.1 when the weights are not renormalised (k = 1); when they are (k >= 2), 0 "
        "with the count controller (--dirmoe-count-control-rate > 0), which holds the count "
        "without pushing every gate to 0 or 1, and 0.01 without it",
        default=None,
    )
    count_control_rate: Optional[float] = _doc(
        "recipe 'calibrated' only: step of the per-layer count controller. Each MoE layer "
        "routes expert i where l_i + c >= 0, with c a bias shared by the layer's experts; after "
        "every optimizer step c moves up by this step when the global batch's mean count of "
        "routed experts per token was below k and down when above (sign rule, as DeepSeek-V3's "
        "expert bias holds each expert's load). c only moves the routing decision: the weights, "
        "pi and the balance term do not see it. 0 turns the controller off; >= 0, default 0.03",
        default=None,
    )
    count_control_on: Optional[str] = _doc(
        "recipe 'calibrated' only: what the count controller counts. 'routed': the experts "
        "each token was routed to, so a token on the top-k fallback counts k and c does not "
        "move while every token rides the fallback; 'gates': the experts whose gates chose "
        "them (l_i + c + b_i >= 0), so a fallback token counts 0 and c rises from the first "
        "step until the gates route (an aux loss can otherwise leave every token of a layer on "
        "the fallback), but the other tokens' gates then also take the fallback tokens' share; "
        "'partial': as 'gates', but a fallback token counts 3k/4, short of k (so an "
        "all-fallback layer still reads as a miss) by a quarter. Default: 'partial' when the "
        "router's own aux loss is on (--dirmoe-aux-loss-coeff > 0), else 'routed'",
        default=None,
    )
    count_control_gain: Optional[float] = _doc(
        "recipe 'calibrated' only: how the count controller's step follows the miss. > 0: c "
        "moves by rate x clamp(gain x (k - n) / k, -1, 1), n the step's mean count, a full "
        "step from a miss of k / gain on and a proportional one below it; 0: by rate x sign(k - "
        "n), a full step whatever the miss (the sign rule holds the median step's count at k, "
        "which is the mean only where the count's step-to-step spread is symmetric). >= 0. "
        "Default: 4 where the controller counts the gates' choice (--dirmoe-count-control-on "
        "gates or partial: next to the aux loss that count jumps from step to step), else 0",
        default=None,
    )
    load_control_rate: Optional[float] = _doc(
        "recipe 'calibrated' only: step of the per-expert load controller (DeepSeek-V3's "
        "auxiliary-loss-free balancing, on the routing decision). Expert i is routed where "
        "l_i + c + b_i >= 0; after every optimizer step b_i moves up by this step when expert i "
        "received fewer routed tokens than --dirmoe-load-control-floor times the mean expert's "
        "in the global batch, and down when more. Like c, b only moves the routing decision. "
        ">= 0; default 0.03 when the weights are renormalised (k >= 2), where it replaces the "
        "balance term, 0.01 next to the router's own aux loss (--dirmoe-aux-loss-coeff > 0, the "
        "default from 32 experts on), and 0 (off) at k = 1",
        default=None,
    )
    load_control_floor: float = _doc(
        "recipe 'calibrated' only: the share of the mean expert load that the load controller "
        "steers toward. 1: every expert toward the mean load (b_i up when below it, down when "
        "above); the balance term is then off by default. Below 1: a floor only, b_i >= 0 "
        "rises while expert i gets less than this share of the mean load and falls back to 0 "
        "once it gets more, so the controller lifts starved experts and leaves the rest of "
        "the balancing to the balance term (--dirmoe-balance-weight, then 0.1 by default). For "
        "k = 1, where the load controller is off by default, --dirmoe-load-control-rate 0.03 "
        "--dirmoe-load-control-floor 0.5 lifts an expert that the balance term leaves starved "
        "(docs/ROUTER_COMPARISON.md, step 10). In (0, 1]",
        default=1.0,
    )
    balance_weight: Optional[float] = _doc(
        "recipe 'calibrated' only: weight beta_z of the aggregate spike prior "
        "sum_e KL(Bern(k/E) || Bern(mean_t pi_te)) over each micro-batch's tokens (balances the "
        "load; prior first, so a gate that never fires still gets a gradient); >= 0. Default "
        "0 where the load controller steers every expert toward the mean load (k >= 2), else "
        "0.1",
        default=None,
    )
    aux_loss_coeff: Optional[float] = _doc(
        "weight of the router's own Switch load-balancing loss, coeff * E / (T k) * sum_i "
        "load_i * sum_t s_ti (Megatron's aux_loss, on the scores of --dirmoe-aux-loss-scores); "
        ">= 0. Default: the recipe's (calibrated: 0.03 with 32 or more experts and k >= 2, where "
        "it trained better models, else 0; paper recipes: 0). Megatron's --moe-aux-loss-coeff "
        "(with --moe-router-load-balancing-type aux_loss) replaces it; give one of the two",
        default=None,
    )
    aux_loss_scores: Optional[str] = _doc(
        "the router probabilities that the aux loss (--dirmoe-aux-loss-coeff, or Megatron's "
        "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff) balances against the "
        "routed load: 'gates' pi / sum(pi) or 'posterior-mean' E_q[theta] = alpha_q / "
        "sum(alpha_q), the share each expert gets in the Dirichlet posterior (the softmax of "
        "the gate logits in the calibrated recipe: what TopK softmax's aux loss reads). "
        "Default: the recipe's (calibrated: posterior-mean; paper recipes: gates)",
        default=None,
    )
    unnormalized_weight: str = _doc(
        "recipe 'calibrated' only: an active expert's weight when the weights are not "
        "renormalised over the active set (k = 1 by default): 'sigmoid' of its centred gate "
        "logit (its own confidence, whatever the other experts' logits, as DeepSeek-V3's "
        "sigmoid router scales its experts) or 'posterior-mean' (its softmax share of the "
        "Dirichlet posterior mean over all E experts, which starts at 1/E; before this release)",
        default="sigmoid",
    )
    slab_mean: str = _doc(
        "recipe 'calibrated' only: where the Dirichlet posterior's mean comes from: 'gate' "
        "(the softmax of the token's gate logits, so the LM loss teaches the gates through the "
        "expert weights) or 'head' (a separate slab head, the gates learning through a "
        "straight-through relaxed Bernoulli sample; the calibrated recipe of release 0.1)",
        default="gate",
    )
    recon_variance: float = _doc(
        "reconstruction variance sigma^2; the KL and sparsity terms are scaled by it", default=1.0
    )
    leak: float = _doc(
        "leak eps_w added to every z_i * theta_i before normalising the combined weights",
        default=1e-3,
    )
    torch_compile: bool = _doc(
        "fuse the router's elementwise math with torch.compile on CUDA (fewer kernel launches); "
        "CPU always runs eagerly",
        default=True,
    )
    capacity_factor: Optional[float] = _doc(
        "expert capacity as a multiple of T * k / E tokens (measured against the target k); "
        "tokens over capacity are dropped by lowest probability. Default: dropless",
        default=None,
    )

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self._resolve_recipe_defaults()

        def bad(name: str, allowed: str) -> None:
            raise ValueError(
                f"{flag_name(name)} (DirMoEConfig.{name}) = {getattr(self, name)!r} is invalid: "
                f"allowed {allowed}"
            )

        if self.recipe not in RECIPES:  # first: the recipe's defaults fill other fields
            bad("recipe", " or ".join(repr(r) for r in RECIPES))

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                bad(name, "a finite value > 0")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                bad(name, "a finite value >= 0")

        if not isinstance(self.target_k, int) or self.target_k < 1:
            bad("target_k", "an integer >= 1 (and <= the number of experts)")
        if self.max_active is not None and (
            not isinstance(self.max_active, int) or self.max_active < self.target_k
        ):
            bad("max_active", f"an integer >= target_k ({self.target_k}) and <= the number of experts")
        if not (0.0 < self.route_threshold < 1.0):
            bad("route_threshold", "the open interval (0, 1)")
        for name in ("tau_start", "tau_end", "prior_scale_start", "prior_scale_end",
                     "posterior_scale", "alpha_lo", "alpha_floor", "recon_variance", "leak"):
            positive(name)
        for name in ("kl_weight", "sparsity_weight", "count_weight", "balance_weight",
                     "count_control_rate"):
            non_negative(name)
        if self.load_control_rate is not None:  # None: resolved with E (`calibrated_for`)
            non_negative("load_control_rate")
        if self.count_control_gain is not None:  # None: resolved with the count (`calibrated_for`)
            non_negative("count_control_gain")
        if not (isinstance(self.load_control_floor, (int, float))
                and 0.0 < self.load_control_floor <= 1.0):
            bad("load_control_floor", "the half-open interval (0, 1]")
        if self.prior_scale_schedule not in ("cosine", "exponential"):
            bad("prior_scale_schedule", "'cosine' or 'exponential'")
        if self.slab_mean not in ("gate", "head"):
            bad("slab_mean", "'gate' or 'head'")
        if self.unnormalized_weight not in ("sigmoid", "posterior-mean"):
            bad("unnormalized_weight", "'sigmoid' or 'posterior-mean'")
        if self.aux_loss_coeff is not None:  # None: resolved with E (`calibrated_for`)
            non_negative("aux_loss_coeff")
        if self.count_control_on not in (None, *FALLBACK_COUNTED):
            bad("count_control_on", "'routed', 'gates' or 'partial'")
        if self.aux_loss_scores not in ("gates", "posterior-mean"):
            bad("aux_loss_scores", "'gates' or 'posterior-mean'")
        if self.tau_schedule not in ("cosine", "exponential"):
            bad("tau_schedule", "'cosine' or 'exponential'")
        if self.tau_decay is not None:
            if not (isinstance(self.tau_decay, (int, float)) and 0.0 < self.tau_decay < 1.0):
                bad("tau_decay", "the open interval (0, 1)")
            if self.tau_schedule != "exponential":
                raise ValueError(f"{flag_name('tau_decay')} needs "
                                 f"{flag_name('tau_schedule')} exponential")
        if self.prior_simpson is not None and self.prior_mass_variance is not None:
            raise ValueError(f"{flag_name('prior_simpson')} and "
                             f"{flag_name('prior_mass_variance')} both set the prior scale; "
                             "give at most one")
        for name in ("prior_simpson", "posterior_simpson"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                bad(name, "the open interval (0, 1) (and above the Simpson index of the mean)")
        if self.prior_mass_variance is not None and not (
            isinstance(self.prior_mass_variance, (int, float)) and 0.0 < self.prior_mass_variance < 0.25
        ):
            bad("prior_mass_variance", "the open interval (0, m (1 - m)) with m the prior mean mass")
        if self.schedule_iters is not None and (
            not isinstance(self.schedule_iters, int) or self.schedule_iters < 1
        ):
            bad("schedule_iters", "an integer >= 1")
        if not (math.isfinite(self.alpha_ceiling) and self.alpha_ceiling > self.alpha_floor):
            bad("alpha_ceiling", f"a finite value > alpha_floor ({self.alpha_floor})")
        if self.posterior_scale > self.alpha_ceiling:
            bad("posterior_scale", f"(0, alpha_ceiling = {self.alpha_ceiling}]")
        if self.prior_ratio is not None and self.prior_mass is not None:
            raise ValueError(
                f"{flag_name('prior_ratio')} and {flag_name('prior_mass')} are both set; "
                "set at most one (r is derived from m when only m is given)"
            )
        if self.prior_ratio is not None and not (
            math.isfinite(self.prior_ratio) and self.prior_ratio >= 1.0
        ):
            bad("prior_ratio", "a finite value >= 1")
        if self.prior_mass is not None and not (0.0 < self.prior_mass < 1.0):
            bad("prior_mass", "the open interval (0, 1)")
        if self.capacity_factor is not None:
            positive("capacity_factor")

    def _resolve_recipe_defaults(self) -> None:
        """Fill the fields left at None with the recipe's defaults (RECIPE_DEFAULTS), once, at
        construction: the stored config then holds concrete numbers."""
        defaults = RECIPE_DEFAULTS.get(self.recipe)
        if defaults is None:
            return  # an unknown recipe: validation names it
        values = dict(defaults)

        def resolved(name: str) -> Any:
            """The value `name` will have: the one given, else the recipe's (as filled so far)."""
            given = getattr(self, name)
            return values[name] if given is None else given

        if values["renormalize"] is None:
            values["renormalize"] = isinstance(self.target_k, int) and self.target_k >= 2
        renormalize = resolved("renormalize")
        if values["count_weight"] is None:
            # k = 1 (no renormalisation) keeps the penalty: without it the gates stay undecided
            # and most tokens ride the top-k fallback.
            values["count_weight"] = (0.1 if not renormalize
                                      else 0.0 if resolved("count_control_rate") else 0.01)
        if values["load_control_rate"] is None and not renormalize:
            # At k = 1 the load controller trained worse models than the balance term
            # (docs/ROUTER_COMPARISON.md, steps 6 and 10).
            values["load_control_rate"] = 0.0
        elif values["load_control_rate"] is None and self.aux_loss_coeff is not None:
            values["load_control_rate"] = _load_control_rate_next_to(self.aux_loss_coeff)
        # else (k >= 2, the aux loss left to E): resolved with E by `calibrated_for`.
        if values["balance_weight"] is None:
            # A floor-only load controller leaves the balancing to the balance term. A rate
            # still None is one of the two positive defaults.
            rate = resolved("load_control_rate")
            two_sided = (rate is None or rate > 0) and self.load_control_floor == 1.0
            values["balance_weight"] = 0.0 if two_sided else 0.1
        for name, value in values.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def validate_for(self, num_experts: int) -> "DirMoEConfig":
        """Check the ranges that depend on the number of experts E; returns ``self``."""
        if not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"--num-experts = {num_experts!r}: DirMoE needs at least 2 experts")
        if self.target_k > num_experts:
            raise ValueError(
                f"{flag_name('target_k')} = {self.target_k} is invalid: allowed 1 <= k <= "
                f"--num-experts ({num_experts})"
            )
        if self.max_active is not None and self.max_active > num_experts:
            raise ValueError(
                f"{flag_name('max_active')} = {self.max_active} is invalid: allowed "
                f"{self.target_k} <= max_active <= --num-experts ({num_experts})"
            )
        if self.target_k == num_experts and self.prior_mass is not None:
            raise ValueError(f"{flag_name('prior_mass')} needs k < E to derive r")
        self.calibrated_for(num_experts)  # an unreachable calibration target fails here
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def routing_rule(self) -> str:
        """The `routing.route` rule of the recipe: 'gate' (calibrated) or 'weight' (paper,
        paper-notes)."""
        return "gate" if self.recipe == "calibrated" else "weight"

    @property
    def slab(self) -> str:
        """The `routing.route` slab: 'gated' (paper: alpha_hi/lo heads mixed by the relaxed
        gate), 'head' (paper-notes: one slab head) or `slab_mean` (calibrated)."""
        return self.slab_of(self.recipe, self.slab_mean)

    @staticmethod
    def slab_of(recipe: str, slab_mean: str = "gate") -> str:
        """`slab` for a recipe name and a `slab_mean` (e.g. from a stored config dict)."""
        return {"paper": "gated", "paper-notes": "head"}.get(recipe, slab_mean)

    @property
    def count_on_sample(self) -> bool:
        """Whether the count penalty reads the relaxed sample z (paper) rather than pi."""
        return self.recipe == "paper"

    @property
    def fallback_k(self) -> int:
        """Experts a token gets when none passes the routing rule: its k most likely
        (calibrated: the routing starts as top-k and stays at k on average) or the argmax
        (paper, paper-notes)."""
        return self.target_k if self.recipe == "calibrated" else 1

    @property
    def effective_balance_weight(self) -> float:
        """beta_z as applied: the paper recipes have no balance term."""
        return self.balance_weight if self.recipe == "calibrated" else 0.0

    @property
    def effective_count_weight(self) -> float:
        """The weight of the recipe's count penalty: `count_weight` (calibrated) or
        `sparsity_weight` (paper, paper-notes)."""
        return self.count_weight if self.recipe == "calibrated" else self.sparsity_weight

    @property
    def effective_count_control_rate(self) -> float:
        """The count controller's step as applied: the paper recipes have no controller."""
        return self.count_control_rate if self.recipe == "calibrated" else 0.0

    @property
    def effective_unnormalized_weight(self) -> str:
        """The single-weight rule as applied: the paper recipes weight by the posterior."""
        return self.unnormalized_weight if self.recipe == "calibrated" else "posterior-mean"

    @property
    def effective_load_control_rate(self) -> Optional[float]:
        """The load controller's step as applied: the paper recipes have no controller. None
        until E is known where it depends on the fine-grained aux loss (`calibrated_for`)."""
        return self.load_control_rate if self.recipe == "calibrated" else 0.0

    def aux_loss_coeff_for(self, num_experts: Optional[int]) -> Optional[float]:
        """The weight of the router's own aux loss: the one given, else the recipe's
        fine-grained rule for E = `num_experts` (only the calibrated recipe leaves it open; the
        paper recipes' is 0). None when the rule needs an E that is not known yet."""
        if self.aux_loss_coeff is not None:
            return self.aux_loss_coeff
        if not (self.renormalize and self.target_k >= FINE_GRAINED_MIN_K):
            return 0.0
        if num_experts is None:
            return None
        return FINE_GRAINED_AUX_LOSS_COEFF if num_experts >= FINE_GRAINED_EXPERTS else 0.0

    def calibrated_for(self, num_experts: int) -> "DirMoEConfig":
        """A copy with what depends on the number of experts E resolved: the fine-grained
        defaults (`aux_loss_coeff`, then `load_control_rate`, `count_control_on` and
        `count_control_gain`, where left at None) and the calibrators: `prior_scale_end` from
        `prior_simpson` or `prior_mass_variance`, `posterior_scale` from `posterior_simpson`
        (closed form, see :mod:`megatron_dirmoe.calibration`), on the prior's shape with k
        experts on. ``self`` when nothing is left to resolve. Errors name the flag when a
        target is unreachable."""
        from megatron_dirmoe import calibration

        changes: dict[str, Any] = {}
        coeff = self.aux_loss_coeff_for(num_experts)
        if self.aux_loss_coeff is None:
            changes["aux_loss_coeff"] = coeff
        if self.load_control_rate is None:
            changes["load_control_rate"] = _load_control_rate_next_to(coeff)
        if self.count_control_on is None:
            # Next to an aux loss a count of routed experts can leave every token of a layer on
            # the top-k fallback for good (a fallback token counts k, so c never moves).
            changes["count_control_on"] = "partial" if coeff > 0 else "routed"
        if self.count_control_gain is None:
            # The gates' count jumps from step to step next to the aux loss, with a long upper
            # tail: the sign rule held its median at k and its mean 3-8% over.
            count_on = changes.get("count_control_on", self.count_control_on)
            changes["count_control_gain"] = (GATES_COUNT_CONTROL_GAIN
                                             if FALLBACK_COUNTED[count_on] < 1.0 else 0.0)
        if (self.prior_simpson, self.prior_mass_variance, self.posterior_simpson) == (None,) * 3:
            return dataclasses.replace(self, **changes) if changes else self
        ratio = self.prior_ratio_for(num_experts)
        base = calibration.on_off_base(num_experts, self.target_k, ratio * self.alpha_lo,
                                       self.alpha_lo)
        try:
            if self.prior_simpson is not None:
                changes["prior_scale_end"] = calibration.scale_for_simpson(self.prior_simpson, base)
            if self.prior_mass_variance is not None:
                changes["prior_scale_end"] = calibration.scale_for_mass_variance(
                    self.prior_mass_variance, base, self.target_k)
        except ValueError as err:
            name = "prior_simpson" if self.prior_simpson is not None else "prior_mass_variance"
            raise ValueError(f"{flag_name(name)}: {err} (E={num_experts}, k={self.target_k}, "
                             f"alpha_hi={ratio * self.alpha_lo:.4g}, alpha_lo={self.alpha_lo})"
                             ) from None
        if self.posterior_simpson is not None:
            try:
                changes["posterior_scale"] = calibration.scale_for_simpson(
                    self.posterior_simpson, base)
            except ValueError as err:
                raise ValueError(f"{flag_name('posterior_simpson')}: {err} (E={num_experts}, "
                                 f"k={self.target_k})") from None
            if changes["posterior_scale"] > self.alpha_ceiling:
                raise ValueError(f"{flag_name('posterior_simpson')} = {self.posterior_simpson} "
                                 f"gives lambda_q = {changes['posterior_scale']:.4g} > "
                                 f"--dirmoe-alpha-ceiling ({self.alpha_ceiling})")
        return dataclasses.replace(self, **changes)

    def max_active_for(self, num_experts: int) -> int:
        """The cap on active experts per token: ``max_active`` or min(E, 4k)."""
        if self.max_active is not None:
            return self.max_active
        return min(num_experts, 4 * self.target_k)

    def prior_ratio_for(self, num_experts: int) -> float:
        """r = alpha_hi / alpha_lo: given, derived from the prior mass m, or the default."""
        if self.prior_ratio is not None:
            return self.prior_ratio
        if self.prior_mass is not None:
            m, k, e = self.prior_mass, self.target_k, num_experts
            return m * (e - k) / ((1.0 - m) * k)
        return DEFAULT_PRIOR_RATIO

    def with_schedule_horizon(self, train_iters: int) -> "DirMoEConfig":
        """A copy whose schedule horizon defaults to ``train_iters`` when unset."""
        if self.schedule_iters is not None:
            return self
        return dataclasses.replace(self, schedule_iters=int(train_iters))


# ---------------------------------------------------------------------- CLI mapping
def flag_name(field_name: str) -> str:
    """`target_k` -> `--dirmoe-target-k`."""
    return FLAG_PREFIX + field_name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in text:
            return typ
    raise TypeError(f"unsupported DirMoEConfig field type {text} for {f.name}")


def add_dirmoe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--dirmoe-*`` flag per :class:`DirMoEConfig` field (usable as Megatron's
    ``extra_args_provider``). Defaults are left as ``None`` so the dataclass stays the only
    place a default lives."""
    group = parser.add_argument_group("DirMoE router", "DirMoE router hyperparameters")
    for f in dataclasses.fields(DirMoEConfig):
        typ = _field_type(f)
        default = f.default
        shown = ("the recipe's" if default is None and f.name in RECIPE_DEFAULTS["calibrated"]
                 else default)
        help_text = f"{f.metadata['help']} (default: {shown})"
        if typ is bool:
            # --dirmoe-X / --dirmoe-no-X, keeping every flag under the --dirmoe- prefix.
            negative = FLAG_PREFIX + "no-" + f.name.replace("_", "-")
            group.add_argument(
                flag_name(f.name), dest=f"dirmoe_{f.name}", action="store_const", const=True,
                default=None, help=help_text,
            )
            group.add_argument(
                negative, dest=f"dirmoe_{f.name}", action="store_const", const=False,
                default=None, help=f"disable {flag_name(f.name)}",
            )
        else:
            group.add_argument(
                flag_name(f.name), dest=f"dirmoe_{f.name}", type=typ, default=None,
                help=help_text,
            )
    return parser


def megatron_aux_loss_on(args) -> Optional[bool]:
    """Whether Megatron's aux loss (--moe-router-load-balancing-type aux_loss with a positive
    --moe-aux-loss-coeff, either flag a single value or a list) is on in `args`; None when the
    namespace has no Megatron MoE flags."""
    if not hasattr(args, "moe_router_load_balancing_type"):
        return None
    types = args.moe_router_load_balancing_type
    coeffs = getattr(args, "moe_aux_loss_coeff", 0.0)
    types = types if isinstance(types, list) else [types]
    # Megatron accepts one coefficient for every type, or one per type.
    coeffs = coeffs if isinstance(coeffs, list) else [coeffs] * len(types)
    return any(t == "aux_loss" and (c or 0.0) > 0 for t, c in zip(types, coeffs))


def dirmoe_config_from_args(args: argparse.Namespace,
                            num_experts: Optional[int] = None) -> DirMoEConfig:
    """The run's validated :class:`DirMoEConfig` from a namespace.

    A namespace that carries ``dirmoe_config`` (the dict the pretraining entry resolves at
    start-up and saves with every checkpoint's args) gives exactly that config. Otherwise the
    ``--dirmoe-*`` flags of a namespace parsed with :func:`add_dirmoe_args` are read; flags not
    given keep the dataclass default, and the schedule horizon defaults to ``args.train_iters``
    when the namespace has one. Validated for `num_experts` (default ``args.num_experts``) when
    known; errors name the flag.
    """
    if num_experts is None:
        num_experts = getattr(args, "num_experts", None)
    stored = getattr(args, "dirmoe_config", None)
    given: dict[str, Any] = {}  # the --dirmoe-* flags given (none when a stored config is read)
    megatron_aux = None  # whether Megatron's aux loss is on; None: its flags are not there
    if isinstance(stored, dict):
        stored = {**IMPLICIT_IN_OLDER_CHECKPOINTS, **stored}
        if stored["recipe"] == "paper" and _FIELD_OF_THREE_HEAD_RELEASE not in stored:
            stored["recipe"] = "paper-notes"  # "paper" named the notes-literal recipe then
        config = DirMoEConfig(**stored)
    else:
        for f in dataclasses.fields(DirMoEConfig):
            value = getattr(args, f"dirmoe_{f.name}", None)
            if value is not None:
                given[f.name] = value
        config = DirMoEConfig(**given)
        # A flag that the chosen recipe ignores is a mistake worth stopping for.
        calibrated_only = ("balance_weight", "count_weight", "slab_mean", "count_control_rate",
                           "load_control_rate", "load_control_floor", "unnormalized_weight",
                           "count_control_on", "count_control_gain")
        ignored = {"paper": calibrated_only, "paper-notes": calibrated_only,
                   "calibrated": ("route_threshold", "sparsity_weight")}[config.recipe]
        for name in ignored:
            if name in given:
                raise ValueError(f"{flag_name(name)} has no effect with {flag_name('recipe')} "
                                 f"{config.recipe}")
        # Megatron's aux loss replaces the router's own: both given is ambiguous.
        megatron_aux = megatron_aux_loss_on(args)
        if megatron_aux and "aux_loss_coeff" in given:
            raise ValueError(f"{flag_name('aux_loss_coeff')} and --moe-aux-loss-coeff both set "
                             "the router's aux loss; give one of the two")
        # A calibrator computes the value it names; giving both is ambiguous.
        for calibrator, target in (("prior_simpson", "prior_scale_end"),
                                   ("prior_mass_variance", "prior_scale_end"),
                                   ("posterior_simpson", "posterior_scale")):
            if calibrator in given and target in given:
                raise ValueError(f"{flag_name(calibrator)} sets {flag_name(target)}; give one "
                                 "of the two")
        if "load_control_floor" in given and config.effective_load_control_rate == 0.0:
            raise ValueError(f"{flag_name('load_control_floor')} has no effect without the load "
                             f"controller: give {flag_name('load_control_rate')} > 0 too (it "
                             "is off by default at k = 1)")
        if getattr(args, "train_iters", None):
            config = config.with_schedule_horizon(args.train_iters)
    if num_experts is not None:
        config = config.validate_for(num_experts).calibrated_for(num_experts)
    # The scores feed an aux loss only: without one the flag would do nothing (the router's own
    # weight is unknown here only when it depends on an E not given).
    own_aux = config.aux_loss_coeff_for(num_experts)
    if "aux_loss_scores" in given and megatron_aux is False and own_aux == 0.0:
        raise ValueError(
            f"{flag_name('aux_loss_scores')} has no effect without an aux loss: "
            f"{flag_name('aux_loss_coeff')} > 0 (the default from {FINE_GRAINED_EXPERTS} "
            f"experts and k = {FINE_GRAINED_MIN_K} on), or --moe-router-load-balancing-type "
            "aux_loss and --moe-aux-loss-coeff > 0")
    return config
