"""`python -m inference.engine.prepare`: make sure the default model is converted; print its path."""

import argparse
import time

from .errors import EngineError
from .loaders import default_gguf_path, prepare_default_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", help="where converted models live (default $R3MES_DATA_DIR/models)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        source = default_gguf_path()
        path = prepare_default_model(args.cache_dir)
    except EngineError as e:
        print(f"error: {e}")
        return 1
    print(f"default model: {source}")
    print(f"converted:     {path.resolve()}  ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
