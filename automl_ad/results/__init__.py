"""What a search leaves: Parquet tables, their bucket mirror, the leaderboard."""
