"""``cemnet package MODEL --out DIR --sample IMAGE``: a saved model as a BioImage Model Zoo package."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cemnet package", description=__doc__)
    p.add_argument("model", help="a saved model (.safetensors written by cemnet finetune)")
    p.add_argument("--out", required=True, help="package folder to write (rdf.yaml + files)")
    p.add_argument("--sample", required=True,
                   help="a real image / volume (any curation reader) whose centre tile becomes the test input and cover")
    p.add_argument("--key", help="HDF5 dataset / zarr array of --sample")
    p.add_argument("--name", help="model name in the RDF")
    p.add_argument("--author", action="append", help="author name (repeat for several)")
    p.add_argument("--license", help="SPDX licence id (default: the model's recorded one, else CC-BY-4.0)")
    p.add_argument("--zip", action="store_true", help="also write DIR.zip (the form the model zoo uploads)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--no-validate", action="store_true", help="skip bioimageio.spec's validation of the result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cemnet.share.package import PackageError, package_model

    try:
        path = package_model(args.model, args.out, args.sample, key=args.key, name=args.name, authors=args.author,
                             license=args.license, overwrite=args.overwrite, zip_package=args.zip)
    except PackageError as err:
        print(f"cemnet package: {err}", file=sys.stderr)
        return 2
    if not args.no_validate:
        from bioimageio.spec import load_description

        from cemnet.share.bioimageio_compat import patch

        patch()
        descr = load_description(path)
        status = descr.validation_summary.status
        if status not in ("passed", "valid-format"):
            print(descr.validation_summary.format(), file=sys.stderr)
            print(f"cemnet package: {path} does not validate ({status})", file=sys.stderr)
            return 1
    print(f"{path}: BioImage Model Zoo package written and validated by bioimageio.spec")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
