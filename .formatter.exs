[
  inputs: ["{mix,.formatter}.exs", "mix/*.exs", "{elixir,test,bench}/**/*.{ex,exs}"],
  line_length: 100
]
