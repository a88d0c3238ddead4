// vqm_runner: the on-device latency benchmark. Loads a bundle's model.pte with the ExecuTorch runtime (our kernels
// come from libvqmobile_executorch.so, linked in, which registers them when it loads), prefills a prompt of token ids
// (in calls of at most the program's largest T, its prefill chunk), decodes greedily with the KV cache and prints
// prefill latency and tokens/s, decode tokens/s, per-token latency percentiles and the process's peak RSS.
// With --logits FILE it instead runs the given tokens one per call (the decode path through the KV cache,
// teacher-forced) and writes their float32 logits, for accuracy checks on a device.
//
// The program's contract is the one export/executorch_export.py writes: forward(tokens int64 [1, T],
// input_pos int64 [1]) -> logits float32 [1, T, vocab], T from 1 to the export's prefill chunk. Tokenization stays
// on the host (`vqmobile generate` prints the ids of a prompt), so this binary needs nothing but the runtime and our
// adapter.
//
// usage: vqm_runner MODEL.pte [--tokens 1,2,3 | --prompt-len N] [--new-tokens N] [--repeats R] [--warmup W]
//                   [--threads N] [--json FILE]
//        vqm_runner MODEL.pte --tokens 1,2,3 --logits FILE [--threads N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr.h>

using executorch::extension::Module;
using executorch::extension::make_tensor_ptr;
using executorch::runtime::EValue;

// The wheel ships libexecutorch_threadpool.so (XNNPACK's thread pool) without its header: these two declarations
// are the part of it the runner calls. Our kernels have their own pool, sized through the adapter's C entry point.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool
extern "C" void vqmobile_et_set_num_threads(int n);
extern "C" const char* vqmobile_et_kernel_path(void);

namespace {

struct Options {
  std::string pte;
  std::vector<int64_t> prompt;
  int new_tokens = 32;
  int repeats = 3;
  int warmup = 1;   // untimed prefill + one decode step first, as llama-bench does: first-call costs stay out
  int threads = 0;  // 0: the runtimes' defaults (all cores)
  std::string json;
  std::string logits;
};

const char* kUsage =
    "usage: vqm_runner MODEL.pte [--tokens 1,2,3 | --prompt-len N] [--new-tokens N] [--repeats R] [--warmup W] "
    "[--threads N] [--json FILE]\n"
    "       vqm_runner MODEL.pte --tokens 1,2,3 --logits FILE [--threads N]\n";

std::string partial_output;  // a temporary file being written: fail() removes it, so nothing half-written stays

[[noreturn]] void fail(const std::string& msg) {
  if (!partial_output.empty()) std::remove(partial_output.c_str());
  std::fprintf(stderr, "vqm_runner: error: %s\n", msg.c_str());
  std::exit(2);
}

long parse_int(const char* s, const char* what, long lo, long hi) {
  char* end = nullptr;
  long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi)
    fail(std::string(what) + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
         "], got '" + s + "'");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  int prompt_len = 16;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) fail(a + " needs a value");
      return argv[++i];
    };
    if (a == "--tokens") {
      std::string list = value();
      size_t start = 0;
      while (start <= list.size()) {
        size_t comma = std::min(list.find(',', start), list.size());
        o.prompt.push_back(parse_int(list.substr(start, comma - start).c_str(), "a token id", 0, 1L << 30));
        start = comma + 1;
      }
    } else if (a == "--prompt-len") {
      prompt_len = (int)parse_int(value(), "--prompt-len", 1, 1 << 16);
    } else if (a == "--new-tokens") {
      o.new_tokens = (int)parse_int(value(), "--new-tokens", 1, 1 << 16);
    } else if (a == "--repeats") {
      o.repeats = (int)parse_int(value(), "--repeats", 1, 1000);
    } else if (a == "--warmup") {
      o.warmup = (int)parse_int(value(), "--warmup", 0, 100);
    } else if (a == "--logits") {
      o.logits = value();
    } else if (a == "--threads") {
      o.threads = (int)parse_int(value(), "--threads", 1, 256);
    } else if (a == "--json") {
      o.json = value();
    } else if (a == "-h" || a == "--help") {
      std::printf("%s", kUsage);
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') {
      fail("unknown option " + a + " (see --help)");
    } else if (o.pte.empty()) {
      o.pte = a;
    } else {
      fail("more than one program given: " + o.pte + " and " + a);
    }
  }
  if (o.pte.empty()) fail("no program given: vqm_runner MODEL.pte (see --help)");
  if (!o.logits.empty() && o.prompt.empty()) fail("--logits needs the token ids to run: pass --tokens 1,2,3");
  if (!o.logits.empty() && !o.json.empty()) fail("--logits and --json are separate modes: pass one of them");
  if (o.prompt.empty())
    for (int i = 0; i < prompt_len; ++i) o.prompt.push_back(1 + i);  // fixed ids: latency does not depend on them
  return o;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Resident set size now and at its peak (this process's own high-water mark, VmHWM), in MB. Not getrusage's
// ru_maxrss where /proc exists: Linux carries the launching process's high-water mark into ru_maxrss across
// fork and exec, so a runner started by a big process (a Python benchmark) would report that process's peak.
double rss_now_mb() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return (double)resident * (double)sysconf(_SC_PAGESIZE) / 1e6;
}

double rss_peak_mb() {
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long kb = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    std::fclose(f);
    if (kb >= 0) return (double)kb * 1024.0 / 1e6;
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_maxrss * 1024.0 / 1e6;  // kilobytes on Linux and Android
}

// One forward call; returns the logits of the last position (valid until the next call).
const float* forward_last(Module& m, std::vector<int64_t> tokens, int64_t pos, int64_t* vocab_out) {
  auto n = (executorch::aten::SizesType)tokens.size();
  auto tok = make_tensor_ptr({1, n}, std::move(tokens));
  auto p = make_tensor_ptr({1}, std::vector<int64_t>{pos});
  auto out = m.forward({EValue(tok), EValue(p)});
  if (!out.ok())
    fail("forward failed with ExecuTorch error " + std::to_string((int)out.error()) +
         " (the log line above names the failing step; token ids must be below the model's vocabulary size, "
         "positions below its max_seq, and the kernel library as new as the program)");
  const auto& logits = out.get()[0].toTensor();
  if (logits.dim() != 3 || logits.scalar_type() != executorch::aten::ScalarType::Float)
    fail("the program's output is not float logits [1, T, vocab]: is this a vqmobile model.pte?");
  *vocab_out = logits.size(2);
  return logits.const_data_ptr<float>() + (logits.size(1) - 1) * *vocab_out;
}

// The first index of the largest of x[0..n) (std::max_element's answer): the maximum over eight interleaved
// running maxima, then its first position; one chain, as in max_element, waits on every comparison, and at a
// 49152-word vocabulary that was 3 % of a decoded token.
int64_t argmax(const float* x, int64_t n) {
  float m[8];
  for (int j = 0; j < 8; ++j) m[j] = n > 0 ? x[0] : 0.0f;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float best = m[0];
  for (int j = 1; j < 8; ++j) best = m[j] > best ? m[j] : best;
  for (i = 0; i < n; ++i)
    if (x[i] == best) return i;
  return 0;
}

// One forward call; returns the argmax of the last position's logits.
int64_t step(Module& m, std::vector<int64_t> tokens, int64_t pos) {
  int64_t vocab = 0;
  const float* last = forward_last(m, std::move(tokens), pos, &vocab);
  return argmax(last, vocab);
}

// The most tokens one forward call takes (the program's largest T: its memory is planned for that many rows of
// logits, so it is usually far below max_seq).
int64_t tokens_per_call(Module& m) {
  auto meta = m.method_meta("forward");
  if (!meta.ok()) fail("the program has no forward method: is this a vqmobile model.pte?");
  auto in = meta->input_tensor_meta(0);
  if (!in.ok() || in->sizes().size() != 2 || in->sizes()[1] < 1)
    fail("the program's first input is not tokens [1, T]: is this a vqmobile model.pte?");
  return in->sizes()[1];
}

// The prompt in calls of at most `chunk` tokens, each at its start position; returns the argmax of the last
// position's logits.
int64_t prefill(Module& m, const std::vector<int64_t>& prompt, int64_t chunk) {
  int64_t vocab = 0;
  const float* last = nullptr;
  for (size_t i = 0; i < prompt.size(); i += (size_t)chunk) {
    std::vector<int64_t> part(prompt.begin() + i, prompt.begin() + std::min(prompt.size(), i + (size_t)chunk));
    last = forward_last(m, std::move(part), (int64_t)i, &vocab);
  }
  return argmax(last, vocab);
}

// Teacher forcing through the decode path: token i at position i, one call each; the logits of every call go to
// `path` as raw float32 [ntokens, vocab], row-major, little-endian (written to a temporary name, then renamed).
void write_logits(Module& m, const std::vector<int64_t>& tokens, const std::string& path) {
  const uint16_t one = 1;
  if (*(const unsigned char*)&one != 1) fail("--logits writes little-endian floats; this machine is big-endian");
  std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail("cannot write " + path);
  partial_output = tmp;
  int64_t vocab = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const float* row = forward_last(m, {tokens[i]}, (int64_t)i, &vocab);
    if (std::fwrite(row, sizeof(float), (size_t)vocab, f) != (size_t)vocab) fail("cannot write " + path);
  }
  if (std::fclose(f) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot write " + path);
  partial_output.clear();
  std::printf("wrote %zu x %lld float32 logits (raw little-endian, row-major, one decode call per token) to %s\n",
              tokens.size(), (long long)vocab, path.c_str());
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += (char)c;
    }
  }
  return out + "\"";
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, (size_t)(q * (v.size() - 1) + 0.5))];
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  if (FILE* f = std::fopen(o.pte.c_str(), "rb")) {
    std::fclose(f);
  } else {
    fail("cannot open " + o.pte + ": pass the model.pte of a bundle from `vqmobile export`");
  }
  if (o.threads > 0) {
    executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool((uint32_t)o.threads);
    vqmobile_et_set_num_threads(o.threads);
  }
  double rss_start = rss_now_mb();
  Module m(o.pte, Module::LoadMode::Mmap);
  if (m.load_forward() != executorch::runtime::Error::Ok)
    fail("could not load the forward method of " + o.pte +
         " (a corrupt program, or a kernel library that is missing: libvqmobile_executorch.so must be beside the "
         "runner)");
  if (!o.logits.empty()) {
    write_logits(m, o.prompt, o.logits);
    return 0;
  }

  const int64_t chunk = tokens_per_call(m);
  for (int w = 0; w < o.warmup; ++w) {
    int64_t first = prefill(m, o.prompt, chunk);
    if (o.new_tokens > 1) step(m, {first}, (int64_t)o.prompt.size());
  }
  std::vector<int64_t> generated;
  std::vector<double> prefill_ms, prefill_tps, decode_tps, token_ms;
  for (int r = 0; r < o.repeats; ++r) {
    std::vector<int64_t> out;
    double t0 = now_s();
    int64_t next = prefill(m, o.prompt, chunk);
    double t1 = now_s();
    out.push_back(next);
    int64_t pos = (int64_t)o.prompt.size();
    for (int i = 1; i < o.new_tokens; ++i, ++pos) {
      double s = now_s();
      next = step(m, {next}, pos);
      token_ms.push_back((now_s() - s) * 1e3);
      out.push_back(next);
    }
    double t2 = now_s();
    prefill_ms.push_back((t1 - t0) * 1e3);
    prefill_tps.push_back((double)o.prompt.size() / (t1 - t0));
    decode_tps.push_back(o.new_tokens > 1 ? (o.new_tokens - 1) / (t2 - t1) : 0.0);
    if (r > 0 && out != generated) fail("greedy tokens differ between repeats: the runtime is not deterministic");
    generated = out;
  }

  std::printf("tokens:");
  for (int64_t t : generated) std::printf(" %lld", (long long)t);
  std::printf("\n");
  double p50 = token_ms.empty() ? 0 : percentile(token_ms, 0.5), p90 = token_ms.empty() ? 0 : percentile(token_ms, 0.9);
  double peak = rss_peak_mb();
  const char* kpath = vqmobile_et_kernel_path();
  std::printf("prompt %zu tokens, %d new, %d repeats: prefill %.2f ms (%.1f tokens/s), decode %.1f tokens/s "
              "(median), per token p50 %.2f ms p90 %.2f ms\n",
              o.prompt.size(), o.new_tokens, o.repeats, percentile(prefill_ms, 0.5), percentile(prefill_tps, 0.5),
              percentile(decode_tps, 0.5), p50, p90);
  std::printf("peak RSS %.1f MB (%.1f MB before the program was loaded), vqmobile kernel path %s\n", peak, rss_start,
              kpath);
  if (!o.json.empty()) {
    std::string tmp = o.json + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f) fail("cannot write " + o.json);
    partial_output = tmp;
    std::fprintf(f, "{\"program\": %s, \"prompt_tokens\": %zu, \"new_tokens\": %d, \"repeats\": %d, "
                 "\"warmup\": %d, \"threads\": %d, \"prefill_ms_median\": %.4f, "
                 "\"prefill_tokens_per_s_median\": %.4f, \"decode_tokens_per_s_median\": %.4f, "
                 "\"token_ms_p50\": %.4f, \"token_ms_p90\": %.4f, \"peak_rss_mb\": %.3f, "
                 "\"rss_before_load_mb\": %.3f, \"kernel_path\": %s, \"tokens\": [",
                 json_string(o.pte).c_str(), o.prompt.size(), o.new_tokens, o.repeats, o.warmup, o.threads,
                 percentile(prefill_ms, 0.5), percentile(prefill_tps, 0.5), percentile(decode_tps, 0.5), p50, p90, peak,
                 rss_start, json_string(kpath).c_str());
    for (size_t i = 0; i < generated.size(); ++i) std::fprintf(f, "%s%lld", i ? ", " : "", (long long)generated[i]);
    std::fprintf(f, "]}\n");
    if (std::fclose(f) != 0 || std::rename(tmp.c_str(), o.json.c_str()) != 0) fail("cannot write " + o.json);
    std::printf("wrote %s\n", o.json.c_str());
  }
  return 0;
}
