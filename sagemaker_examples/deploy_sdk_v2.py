"""Deploy the image to a real-time endpoint with the SageMaker Python SDK v2 (`pip install 'sagemaker<3'`).

Uses the same `HuggingFaceModel` call as Hugging Face's TGI image, only with our `image_uri`:

    python deploy_sdk_v2.py --image-uri 111122223333.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm:latest \\
        --role arn:aws:iam::111122223333:role/SageMakerRole --model-id Qwen/Qwen2.5-1.5B-Instruct \\
        --endpoint-name my-llm
    python deploy_sdk_v2.py ... --delete          # remove the endpoint, its config and the model again

Environment fallbacks: IMAGE_URI, SAGEMAKER_ROLE_ARN, HF_MODEL_ID, ENDPOINT_NAME, AWS_REGION.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")

INSTANCE_TYPE = "ml.g5.2xlarge"  # 1x A10G (24 GB): fits 7-8B models in bf16


def model_env(model_id: str, num_gpus: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment: the same variable names as Hugging Face's TGI image.

    An empty `model_id` leaves HF_MODEL_ID out: the container then serves what SageMaker unpacked into
    /opt/ml/model from `model_data`.
    """
    env = {"SM_NUM_GPUS": str(num_gpus), "MESSAGES_API_ENABLED": "true"}
    if model_id:
        env = {"HF_MODEL_ID": model_id, **env}
    if os.environ.get("HF_TOKEN"):  # gated models
        env["HF_TOKEN"] = os.environ["HF_TOKEN"]
    env.update(extra or {})
    return env


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Arguments for `HuggingFaceModel(...)`."""
    kwargs: dict[str, Any] = {
        "image_uri": args.image_uri,
        "role": args.role,
        "env": model_env(args.model_id, args.num_gpus, dict(args.env)),
    }
    if args.model_name:
        kwargs["name"] = args.model_name
    if args.model_data:
        kwargs["model_data"] = args.model_data
    return kwargs


def deploy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Arguments for `model.deploy(...)`."""
    kwargs: dict[str, Any] = {
        "initial_instance_count": args.instance_count,
        "instance_type": args.instance_type,
        "endpoint_name": args.endpoint_name,
        # Downloading and loading the weights takes minutes; the default health-check window is 4.
        "container_startup_health_check_timeout": args.startup_timeout,
        "wait": not args.no_wait,
    }
    if args.inference_ami_version:
        kwargs["inference_ami_version"] = args.inference_ami_version
    return kwargs


def make_session(region: str | None, boto_session=None):
    import boto3
    import sagemaker

    return sagemaker.Session(boto_session=boto_session or boto3.Session(region_name=region))


def deploy(args: argparse.Namespace, session=None):
    """Create the model, endpoint config and endpoint; return a HuggingFacePredictor (JSON in, JSON out)."""
    from sagemaker.huggingface import HuggingFaceModel

    session = session or make_session(args.region)
    model = HuggingFaceModel(sagemaker_session=session, **model_kwargs(args))
    return model.deploy(**deploy_kwargs(args))


def delete(endpoint_name: str, session=None, region: str | None = None) -> None:
    """Delete the endpoint, then its config and model (names taken from the endpoint)."""
    from sagemaker.huggingface import HuggingFacePredictor

    predictor = HuggingFacePredictor(endpoint_name, sagemaker_session=session or make_session(region))
    predictor.delete_model()
    predictor.delete_endpoint(delete_endpoint_config=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-uri", default=env("IMAGE_URI"))
    parser.add_argument("--role", default=env("SAGEMAKER_ROLE_ARN"), help="IAM role ARN that SageMaker assumes")
    parser.add_argument(
        "--model-id",
        default=env("HF_MODEL_ID", "Qwen/Qwen2.5-1.5B-Instruct"),
        help="Hugging Face hub id; '' to serve --model-data instead",
    )
    parser.add_argument(
        "--model-data",
        default=env("MODEL_DATA"),
        help="s3://.../model.tar.gz that SageMaker unpacks into /opt/ml/model",
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="SM_NUM_GPUS: tensor-parallel degree")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=lambda kv: tuple(kv.split("=", 1)),
        metavar="NAME=VALUE",
        help="extra container environment, e.g. MAX_TOTAL_TOKENS=4096",
    )
    parser.add_argument("--endpoint-name", default=env("ENDPOINT_NAME", "sagemaker-llm"))
    parser.add_argument("--model-name")
    parser.add_argument("--instance-type", default=INSTANCE_TYPE)
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument(
        "--inference-ami-version",
        default=env("INFERENCE_AMI_VERSION"),
        help="host AMI, e.g. al2023-ami-sagemaker-inference-gpu-4-1 (NVIDIA driver 580); default: SageMaker's choice",
    )
    parser.add_argument("--startup-timeout", type=int, default=900, help="seconds until /ping must answer 200")
    parser.add_argument("--region", default=env("AWS_REGION") or env("AWS_DEFAULT_REGION"))
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--delete", action="store_true", help="delete the endpoint instead of creating it")
    args = parser.parse_args(argv)
    if not args.delete and not (args.image_uri and args.role):
        parser.error("--image-uri (IMAGE_URI) and --role (SAGEMAKER_ROLE_ARN) are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.delete:
        delete(args.endpoint_name, region=args.region)
        print(f"deleted {args.endpoint_name}")
        return 0
    predictor = deploy(args)
    print(f"endpoint {predictor.endpoint_name} is in service")
    if not args.no_wait:
        reply = predictor.predict({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32})
        print(reply["choices"][0]["message"]["content"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
