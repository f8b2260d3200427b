[
  inputs: ["{mix,.formatter}.exs", "{elixir,test,bench}/**/*.{ex,exs}"],
  line_length: 100
]
