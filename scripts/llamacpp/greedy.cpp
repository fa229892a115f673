// Greedy generation with llama.cpp's library, for scripts/check-exports-llamacpp.sh.
//
//   greedy -m model.gguf [-l adapter.gguf] [-n steps] [-t threads] -f prompt.txt
//
// The prompt file holds an already rendered chat prompt (special tokens as text); it is
// tokenized by llama.cpp itself (parse_special = true, no BOS added: the text carries what the
// template puts). Prints three lines: "prompt_ids: ..." and "answer: ..." (token ids), the
// answer ending at the first end-of-generation token (included) or after `steps` tokens, and
// "text: ..." (the answer's text before the end token, newlines as \n).
#include "llama.h"

#include <clocale>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void set_tokens(llama_batch_ext * batch, const llama_token * tokens, int32_t n, llama_pos pos0) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n - 1, true);
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::string model_path, lora_path, prompt_path;
    int steps = 64;
    int threads = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-m")) model_path = argv[i + 1];
        else if (!strcmp(argv[i], "-l")) lora_path = argv[i + 1];
        else if (!strcmp(argv[i], "-f")) prompt_path = argv[i + 1];
        else if (!strcmp(argv[i], "-n")) steps = std::stoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) threads = std::stoi(argv[i + 1]);
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    if (model_path.empty() || prompt_path.empty()) {
        fprintf(stderr, "usage: %s -m model.gguf [-l adapter.gguf] [-n steps] [-t threads] -f prompt.txt\n", argv[0]);
        return 2;
    }
    std::ifstream in(prompt_path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string prompt = ss.str();

    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
    }, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.progress_callback = [](float, void *) { return true; };
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "error: cannot load %s\n", model_path.c_str()); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), NULL, 0, false, true);
    std::vector<llama_token> ids(n_prompt);
    if (llama_tokenize(vocab, prompt.c_str(), prompt.size(), ids.data(), ids.size(), false, true) < 0) {
        fprintf(stderr, "error: cannot tokenize the prompt\n");
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + steps + 8;
    cp.n_batch = n_prompt;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "error: cannot create a context\n"); return 1; }
    if (!lora_path.empty()) {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, lora_path.c_str());
        if (!lora) { fprintf(stderr, "error: cannot load the adapter %s\n", lora_path.c_str()); return 1; }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) {
            fprintf(stderr, "error: cannot apply the adapter\n");
            return 1;
        }
    }
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    printf("prompt_ids:");
    for (auto t : ids) printf(" %d", t);
    printf("\nanswer:");
    std::string text;
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    set_tokens(batch, ids.data(), n_prompt, 0);
    int n_pos = 0, n_tokens = n_prompt;
    for (int s = 0; s < steps; ++s) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
            fprintf(stderr, "error: decode failed\n");
            return 1;
        }
        n_pos += n_tokens;
        llama_token next = llama_sampler_sample(smpl, ctx, -1);
        printf(" %d", next);
        if (llama_vocab_is_eog(vocab, next)) break;
        char buf[256];
        const int n = llama_token_to_piece(vocab, next, buf, sizeof(buf), 0, false);
        if (n > 0) text.append(buf, n);
        set_tokens(batch, &next, 1, n_pos);
        n_tokens = 1;
    }
    printf("\ntext: ");
    for (char c : text) {
        if (c == '\n') printf("\\n"); else putchar(c);
    }
    printf("\n");
    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
