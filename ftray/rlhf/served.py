"""A served reward model, reached through its Ray Serve deployment handle (no HTTP in the loop).

`ServedReward(app, scorer)` calls the `score-<scorer>` deployment of the Serve application `app` (the
ftray Serve app, `ftray.serve.app:build_app`). A call that fails because a replica died, was restarted or
is overloaded is retried with backoff until `timeout_s` has passed; then the job fails with one line that
names the application, not a hang. `deploy_reward_app(ref)` starts such an application from a `reward` run
folder (the driver does it before the workers start, when the job's `method.reward_model.path` is set).
"""

from __future__ import annotations

import time

__all__ = ["RewardServiceError", "ServedReward", "check_reward_app", "deploy_reward_app", "serve_reward_model"]


class RewardServiceError(RuntimeError):
    pass


class ServedReward:
    def __init__(self, app: str, scorer: str, timeout_s: float = 60.0, call_timeout_s: float = 30.0):
        self.app, self.deployment = app, f"score-{scorer}"
        self.timeout_s, self.call_timeout_s = timeout_s, call_timeout_s
        self.retries = 0  # calls retried so far (reported by the method)
        self._handle = None

    def _get_handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app)
        return self._handle

    def __call__(self, items: list) -> list[float]:
        """One score per item: a rendered string, {"prompt", "response"} or {"messages"} (`ScorerEngine.text`)."""
        deadline, wait, last = time.time() + self.timeout_s, 0.5, None
        while True:
            try:
                rows = self._get_handle().score.remote(items).result(timeout_s=self.call_timeout_s)
                return [float(r["score"]) for r in rows]
            except Exception as e:  # replica died / restarting / unavailable / timed out: retry until the deadline
                last = e
                self._handle = None
            if time.time() + wait > deadline:
                raise RewardServiceError(
                    f"method.reward_model: Serve app {self.app!r} deployment {self.deployment!r} did not answer "
                    f"for {self.timeout_s:.0f} s ({self.retries} retries); last error: "
                    f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}"
                )
            self.retries += 1
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


def deploy_reward_app(ref, resolved_path: str) -> None:
    """Deploy the `reward` run folder `resolved_path` as Serve application `ref.app` (scorer `ref.scorer`),
    no HTTP route; returns when it is running. An application of that name is replaced."""
    from ray import serve

    from ftray.serve.app import build_app
    from ftray.serve.config import ServeConfig

    cfg = ServeConfig.model_validate(
        {
            "scorers": [{"name": ref.scorer, "path": resolved_path, "kind": "reward", "deployment": {"num_cpus": ref.num_cpus}}],
            # Rollouts call the scorer by handle; the HTTP ingress only routes, so it reserves no CPU that the
            # job's workers need (a 2-worker job + reward replica then fits exactly what the spec asks for).
            "ingress": {"num_cpus": 0.0, "max_ongoing_requests": 64, "max_queued_requests": 64, "max_batch_size": 1},
            # Bound to loopback and called by handle from the job's workers; nothing to authenticate.
            "auth": {"allow_no_keys": True},
        }
    )
    serve.start(http_options={"host": "127.0.0.1"})
    serve.run(build_app(cfg), name=ref.app, route_prefix=f"/{ref.app}", blocking=False)


def check_reward_app(ref) -> None:
    """Raise RewardServiceError when application `ref.app` is not running (no `path` to deploy it from)."""
    from ray import serve

    apps = serve.status().applications
    if ref.app not in apps:
        raise RewardServiceError(
            f"method.reward_model.app: no Serve application {ref.app!r} is running (running: {sorted(apps) or 'none'}); "
            "deploy it or set `method.reward_model.path` to a reward run folder"
        )


def serve_reward_model(ref) -> None:
    """On the driver once Ray is up, before the workers start: deploy the reward run `ref.path` as `ref.app`
    when it is set, then check that the application runs (RewardServiceError naming it otherwise)."""
    if ref.path is not None:
        from ftray.models.load import resolve

        deploy_reward_app(ref, resolve(ref.path, None).base)
    check_reward_app(ref)
