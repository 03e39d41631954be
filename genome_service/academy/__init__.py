"""The Academy: sessions that plan, generate challenges, judge answers and train LoRA layers."""
