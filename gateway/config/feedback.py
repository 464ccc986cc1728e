"""Feedback's settings: the store, the experiment's arms, the learner (`feedback:` in the config).

Part of the one settings tree (`gateway.config.Settings.feedback`), validated with it at
start-up and on a reload; kept apart so that the feedback modules need not read the rest.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.config.store_urls import check_store_url
from gateway.core.fusion import FusionName

__all__ = ["ArmSettings", "ExperimentSettings", "FeedbackSettings", "LearnerSettings"]

_Strict = ConfigDict(extra="forbid", frozen=True)


class ArmSettings(BaseModel):
    """One arm of the fusion experiment: the users it gets, and how it fuses for them."""

    model_config = _Strict

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # Not `none`: an arm that shows no fused ranking gives nothing to click and learn from.
    fusion: FusionName
    share: float = Field(
        gt=0, description="Its share of the users (shares are normalised over the arms)."
    )
    weights: dict[str, Annotated[float, Field(ge=0)]] | Literal["learned"] | None = Field(
        default=None,
        description="Fusion weights by recommender for this arm (the others keep theirs), or "
        "`learned`: the weights the learner publishes; null: the recommenders' own. A weight "
        "of 0 leaves that recommender out of this arm's fusion (`{c: 0, d: 0}` with "
        "`interleave`: team-draft between the others alone).",
    )
    explore: bool = Field(
        default=False,
        description="An exploration arm (interleaving, for the learner's evidence): its share "
        "falls from `share` as the learner's preferences narrow, as the square of the widest "
        "95% half-width among them over 0.5 (about 1/evidence), down to `min_share`.",
    )
    min_share: float = Field(
        default=0.0,
        ge=0,
        description="The share an exploring arm falls to at most (0: exploration may stop "
        "almost entirely once every preference is known).",
    )

    @model_validator(mode="after")
    def _min_share_below_share(self) -> ArmSettings:
        if self.min_share > self.share:
            raise ValueError(
                f"arm {self.name}: min_share ({self.min_share}) must not exceed share "
                f"({self.share})"
            )
        return self


class ExperimentSettings(BaseModel):
    """Users split between fusion arms, sticky per user
    (`gateway.feedback.impressions.assign_arm`)."""

    model_config = _Strict

    arms: list[ArmSettings] = Field(
        default_factory=list,
        description="Empty: no experiment; every request fuses as `fusion` says, arm null.",
    )

    @field_validator("arms")
    @classmethod
    def _arm_names_are_unique(cls, value: list[ArmSettings]) -> list[ArmSettings]:
        names = [arm.name for arm in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"arm names must be unique; repeated: {duplicates}")
        return value


class LearnerSettings(BaseModel):
    """The online learner of RRF weights from interleaving outcomes (`gateway.feedback.learner`)."""

    model_config = _Strict

    enabled: bool = Field(default=True, description="Off: the configured weights, always.")
    frozen: bool = Field(
        default=False, description="Keep the weights in use whatever the evidence says."
    )
    min_evidence: int = Field(
        default=100,
        ge=0,
        description="Pairwise comparisons needed before the weights leave an equal start; a "
        "prior (start_weights, or configured weights that differ) moves from the first, "
        "`prior` its brake.",
    )
    floor: float = Field(default=0.1, gt=0, description="No weight goes below this.")
    max_weight: float = Field(default=5.0, gt=0, description="No weight goes above this.")
    beta: float = Field(
        default=4.0,
        ge=0,
        description="A weight is initial · e^(beta · (margin - the start's margin)): within "
        "e^±2·beta of the initial one.",
    )
    prior: float = Field(
        default=50.0,
        gt=0,
        description="Pseudo-comparisons at the start's margin (0 for an equal start) that "
        "shrink a thin record's margin towards it: the prior's strength.",
    )
    start_strength: float = Field(
        default=1000.0,
        gt=0,
        description="Comparisons a prior (start_weights, or configured weights that differ) "
        "is worth while the evidence agrees with its order; once more of the comparisons its "
        "order decides disagree with it than agree, 95% sure, it is worth `prior` only.",
    )
    interval_s: float = Field(default=30.0, gt=0, description="How often each worker learns.")
    cold_start: Literal["equal", "leader"] = Field(
        default="leader",
        description="With no prior (no start_weights, equal configured weights), what is "
        "served until min_evidence: `leader`, once a recommender's share of its decided "
        "comparisons has a 95% interval above one half (in clicked answers), it nearly alone "
        "(max_weight, the others at floor), else the equal weights; `equal`, the equal weights "
        "throughout. Measured in the online benchmark, `leader` served better in both worlds "
        "under both click models (docs/online.md).",
    )
    start_weights: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description="Where learning starts, by recommender (the prior: weights fitted offline, "
        "as `python -m benchmarks quality --write-weights` writes them); `prior` says how many "
        "comparisons they are worth. Null: the recommenders' configured weights.",
    )

    @model_validator(mode="after")
    def _floor_below_max(self) -> LearnerSettings:
        if self.floor > self.max_weight:
            raise ValueError(f"floor ({self.floor}) must not exceed max_weight ({self.max_weight})")
        return self


class FeedbackSettings(BaseModel):
    """Impressions and clicks: the feedback store, the experiment and the learner."""

    model_config = _Strict

    store: str | None = Field(
        default=None,
        description="`sqlite:///PATH` or `redis://host:port/N`; null: feedback off "
        "(no impressions, /feedback and /experiments answer 404).",
    )
    salt: SecretStr | None = Field(
        default=None,
        description="Key of the users' pseudonyms (HMAC), which pick their arm; neither the "
        "pseudonym nor the raw user id is stored. Required with a store; keep it secret, and "
        "the same on every instance.",
    )
    retention_s: float = Field(
        default=7 * 86400, gt=0, description="How long an impression can be clicked."
    )
    flush_interval_ms: float = Field(
        default=100, gt=0, le=60_000, description="How often a worker writes its impressions."
    )
    queue_limit: int = Field(
        default=10_000,
        ge=1,
        description="Impressions a worker holds unwritten; beyond it they are dropped and "
        "counted, never waited for.",
    )
    max_events: int = Field(default=1000, ge=1, description="Most events in one /feedback.")
    store_timeout_ms: float = Field(
        default=2000,
        gt=0,
        le=60_000,
        description="Longest one store operation may take (SQLite's busy timeout, Redis' socket "
        "timeout); then it fails, and nothing of it is counted.",
    )
    answer_within_ms: float = Field(
        default=2000,
        gt=0,
        le=60_000,
        description="Longest a /feedback waits for its events to be taken to the store; then "
        "they are withdrawn and it is answered 503: nothing of it is counted. Once taken, the "
        "answer waits for the store (at most store_timeout_ms).",
    )
    stop_within_ms: float = Field(
        default=1500,
        ge=0,
        le=60_000,
        description="On a graceful stop, how long a worker keeps trying to write the "
        "impressions it holds while the store fails; what is still unwritten then is logged "
        "and counted as dropped.",
    )
    report_refresh_ms: float = Field(
        default=500,
        ge=0,
        le=60_000,
        description="How long a worker answers GET /experiments from one snapshot of the "
        "store's counters; 0: read them afresh on every GET. A GET never writes.",
    )
    event_queue_limit: int = Field(
        default=10_000,
        ge=1,
        description="Events a worker holds waiting to be judged; a /feedback beyond it is "
        "answered 503 (unless nothing waits).",
    )
    experiments: ExperimentSettings = ExperimentSettings()
    learner: LearnerSettings = LearnerSettings()

    @field_validator("store", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        # GATEWAY_FEEDBACK__STORE= (empty) switches feedback off, as null does in the file.
        return None if value == "" else value

    @field_validator("store")
    @classmethod
    def _store_url_is_known(cls, value: str | None) -> str | None:
        if value is not None:
            check_store_url(value)
        return value

    @model_validator(mode="after")
    def _salted(self) -> FeedbackSettings:
        if self.store is not None and (
            self.salt is None or not self.salt.get_secret_value().strip()
        ):
            raise ValueError(
                "a feedback store needs a salt for the users' pseudonyms: set feedback.salt "
                "or GATEWAY_FEEDBACK__SALT to a long random secret, the same on every "
                "instance"
            )
        return self

    @property
    def enabled(self) -> bool:
        """Whether feedback is on (a store is configured)."""
        return self.store is not None
