"""Deploy the image with the SageMaker Python SDK v3 (`pip install 'sagemaker>=3'`): ModelBuilder, image only.

v3 has no `sagemaker.huggingface`; `ModelBuilder(image_uri=...)` with no model object is a pass-through deploy of
our image. Two v3 quirks are handled here: `import sagemaker.serve` fails with NoRegionError unless a region is
configured (so the region is set before the import), and `Endpoint.invoke_with_response_stream` is broken in
sagemaker-core 2.27 (stream with boto3 instead: invoke_boto3.py --stream).

    python deploy_sdk_v3.py --image-uri 111122223333.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm:latest \\
        --role arn:aws:iam::111122223333:role/SageMakerRole --model-id Qwen/Qwen2.5-1.5B-Instruct \\
        --endpoint-name my-llm --region us-east-1

Environment fallbacks: IMAGE_URI, SAGEMAKER_ROLE_ARN, HF_MODEL_ID, ENDPOINT_NAME, AWS_REGION.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

INSTANCE_TYPE = "ml.g5.2xlarge"  # 1x A10G (24 GB)


def model_env(model_id: str, num_gpus: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment: the same variable names as Hugging Face's TGI image."""
    env = {"HF_MODEL_ID": model_id, "SM_NUM_GPUS": str(num_gpus), "MESSAGES_API_ENABLED": "true"}
    if os.environ.get("HF_TOKEN"):  # gated models
        env["HF_TOKEN"] = os.environ["HF_TOKEN"]
    env.update(extra or {})
    return env


def builder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Arguments for `ModelBuilder(...)`: image only, no model object, so no model_server is needed."""
    return {
        "image_uri": args.image_uri,
        "env_vars": model_env(args.model_id, args.num_gpus, dict(args.env)),
        "role_arn": args.role,
        "instance_type": args.instance_type,
    }


def deploy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Arguments for `ModelBuilder.deploy(...)`."""
    return {
        "endpoint_name": args.endpoint_name,
        "initial_instance_count": args.instance_count,
        # Downloading and loading the weights takes minutes; this is the /ping startup window.
        "container_timeout_in_seconds": args.startup_timeout,
        "wait": not args.no_wait,
    }


def chat_body(prompt: str, max_tokens: int = 64) -> str:
    return json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})


def deploy(args: argparse.Namespace):
    """Build the model and deploy it; return the `sagemaker.core.resources.Endpoint`."""
    if args.region:
        os.environ["AWS_DEFAULT_REGION"] = args.region  # must precede the import below
    from sagemaker.serve import ModelBuilder

    builder = ModelBuilder(**builder_kwargs(args))
    builder.build(model_name=args.model_name)  # None: a generated name
    return builder.deploy(**deploy_kwargs(args))


def invoke(endpoint, prompt: str) -> str:
    """One chat request through v3's `Endpoint.invoke`; returns the reply text."""
    response = endpoint.invoke(body=chat_body(prompt), content_type="application/json", accept="application/json")
    reply = json.loads(response.body.read())
    return reply["choices"][0]["message"]["content"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-uri", default=env("IMAGE_URI"))
    parser.add_argument("--role", default=env("SAGEMAKER_ROLE_ARN"), help="IAM role ARN that SageMaker assumes")
    parser.add_argument("--model-id", default=env("HF_MODEL_ID", "Qwen/Qwen2.5-1.5B-Instruct"))
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
    parser.add_argument("--startup-timeout", type=int, default=900, help="seconds until /ping must answer 200")
    parser.add_argument("--region", default=env("AWS_REGION") or env("AWS_DEFAULT_REGION"))
    parser.add_argument("--no-wait", action="store_true")
    args = parser.parse_args(argv)
    if not (args.image_uri and args.role):
        parser.error("--image-uri (IMAGE_URI) and --role (SAGEMAKER_ROLE_ARN) are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    endpoint = deploy(args)
    print(f"endpoint {args.endpoint_name} deployed")
    if not args.no_wait:
        print(invoke(endpoint, "Say hello."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
