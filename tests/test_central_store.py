"""The object store launcher that the central stack, raw custody and the S3 model remote build on."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError


def test_the_store_keeps_objects_and_refuses_other_keys(s3_store):
    s3_store.create_bucket("launcher-check")
    s3_store.create_bucket("launcher-check")  # again: an existing bucket is fine
    client = s3_store.client()
    client.put_object(Bucket="launcher-check", Key="a/b.bin", Body=b"\x00" * 1000)
    assert client.get_object(Bucket="launcher-check", Key="a/b.bin")["Body"].read() == b"\x00" * 1000

    stranger = boto3.client(
        "s3",
        endpoint_url=s3_store.endpoint,
        aws_access_key_id="someone-else",
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError):
        stranger.list_objects_v2(Bucket="launcher-check")
    assert s3_store.env()["AWS_ENDPOINT_URL"] == s3_store.endpoint
