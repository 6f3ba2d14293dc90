"""fastrl: a fast, lean GRPO trainer."""
