"""`python -m serving --model_name NAME --model_dir DIR`: how KServe runs a custom predictor."""

from serving.cli import main

if __name__ == "__main__":
    main()
