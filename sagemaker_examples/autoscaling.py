"""Autoscale an endpoint's instance count with Application Auto Scaling (target tracking).

The policy tracks `SageMakerVariantInvocationsPerInstance`: invocations per instance per minute. An LLM request
holds a GPU for seconds, so pick the target from a load test (requests/minute one instance serves at an
acceptable latency) rather than from a CPU model's numbers.

    python autoscaling.py --endpoint-name my-llm --min 1 --max 4 --target 60
    python autoscaling.py --endpoint-name my-llm --delete      # back to a fixed instance count
"""

from __future__ import annotations

import argparse
import os
import sys

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC = "SageMakerVariantInvocationsPerInstance"


def resource_id(endpoint_name: str, variant: str = "AllTraffic") -> str:
    return f"endpoint/{endpoint_name}/variant/{variant}"


def policy_name(endpoint_name: str) -> str:
    return f"{endpoint_name}-invocations-per-instance"


def scalable_target_request(endpoint_name: str, variant: str, min_capacity: int, max_capacity: int) -> dict:
    """Arguments for `register_scalable_target`."""
    if not 1 <= min_capacity <= max_capacity:
        raise ValueError(f"need 1 <= min ({min_capacity}) <= max ({max_capacity})")
    return {
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint_name, variant),
        "ScalableDimension": DIMENSION,
        "MinCapacity": min_capacity,
        "MaxCapacity": max_capacity,
    }


def scaling_policy_request(
    endpoint_name: str,
    variant: str,
    target_invocations: float,
    scale_in_cooldown: int = 300,
    scale_out_cooldown: int = 60,
) -> dict:
    """Arguments for `put_scaling_policy`: scale out fast, scale in slowly (a new instance loads the model)."""
    if target_invocations <= 0:
        raise ValueError(f"target invocations per instance must be > 0, got {target_invocations}")
    return {
        "PolicyName": policy_name(endpoint_name),
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint_name, variant),
        "ScalableDimension": DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(target_invocations),
            "PredefinedMetricSpecification": {"PredefinedMetricType": METRIC},
            "ScaleInCooldown": scale_in_cooldown,
            "ScaleOutCooldown": scale_out_cooldown,
        },
    }


def apply(client, target_request: dict, policy_request: dict) -> str:
    """Register the variant as scalable, attach the policy; return the policy ARN."""
    client.register_scalable_target(**target_request)
    return client.put_scaling_policy(**policy_request)["PolicyARN"]


def remove(client, endpoint_name: str, variant: str) -> None:
    """Delete the policy and deregister the variant."""
    common = {
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint_name, variant),
        "ScalableDimension": DIMENSION,
    }
    client.delete_scaling_policy(PolicyName=policy_name(endpoint_name), **common)
    client.deregister_scalable_target(**common)


def make_client(region: str | None):
    import boto3

    return boto3.client("application-autoscaling", region_name=region)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint-name", default=env("ENDPOINT_NAME"), required=env("ENDPOINT_NAME") is None)
    parser.add_argument("--variant", default="AllTraffic")
    parser.add_argument("--min", type=int, default=1, dest="min_capacity")
    parser.add_argument("--max", type=int, default=4, dest="max_capacity")
    parser.add_argument("--target", type=float, default=60.0, help="invocations per instance per minute")
    parser.add_argument("--scale-in-cooldown", type=int, default=300)
    parser.add_argument("--scale-out-cooldown", type=int, default=60)
    parser.add_argument("--region", default=env("AWS_REGION") or env("AWS_DEFAULT_REGION"))
    parser.add_argument("--delete", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = make_client(args.region)
    if args.delete:
        remove(client, args.endpoint_name, args.variant)
        print(f"autoscaling removed from {resource_id(args.endpoint_name, args.variant)}")
        return 0
    target = scalable_target_request(args.endpoint_name, args.variant, args.min_capacity, args.max_capacity)
    policy = scaling_policy_request(
        args.endpoint_name, args.variant, args.target, args.scale_in_cooldown, args.scale_out_cooldown
    )
    print(apply(client, target, policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
